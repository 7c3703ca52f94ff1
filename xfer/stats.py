"""Statistics of a transfer study (pure functions: arrays and DataFrames in, numbers and DataFrames out).

Conventions follow Kornblith et al. 2019:

* Accuracies are compared on the **log-odds** scale, ``logit(p) = ln(p / (1 - p))``; a difference of
  1 log-odds unit means the same relative change in errors whether accuracy is 60% or 99%.
  ``logit`` clips p to ``[eps, 1 - eps]`` first: ``eps = 1 / (2 n)`` when the test-set size n is
  known (half an example: keeps 0/n and n/n finite and ordered below 1/n and (n-1)/n), else
  ``DEFAULT_EPS = 1e-4``.
* The headline is Pearson r between a model's source (ImageNet) top-1 and its mean log-odds
  transfer accuracy over datasets, per regime, with a percentile bootstrap CI over models (seeded)
  and Spearman ρ beside it. Means over datasets need every model on every dataset: the analysis
  uses the largest complete model × dataset block found greedily (``complete_block``) and says
  what it left out.
* **Each result counts once.** Model entries that share one trial (a random-init result is the same
  run for every entry of one architecture and preprocessing: the rows share a ``run_id``) are one
  point of every correlation — at the mean of their source top-1s — not one point per name
  (``shared_groups``). **Stand-ins** (rows whose ``stand_in`` is true: other weights run under a paper
  model's name) are in the headline's r, and a second r leaves them out (``headline``'s
  ``without_stand_ins``).
* Per-model error bars are within-subject intervals (Cousineau 2005 normalisation with Morey 2008's
  correction), the datasets being the "subjects" and the models the within-subject factor.
* "Not significantly worse than the best" per dataset: two-sided exact McNemar test (a binomial
  test on the discordant pairs) on per-example correctness for single-label top-1, else a paired
  permutation test that swaps the two models' per-example predictions and recomputes the dataset's
  own metric (mean per-class accuracy, 11-point mAP for multi-label data); alpha 0.05.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

log = logging.getLogger(__name__)

DEFAULT_EPS = 1e-4
ALPHA = 0.05

MetricFn = Callable[[np.ndarray, np.ndarray], float]
Predictions = Mapping[tuple[str, str, str], "tuple[np.ndarray, np.ndarray] | None"]


# ------------------------------------------------------------------ log-odds
def clip_eps(n: int | np.ndarray | None = None) -> float | np.ndarray:
    """The clipping margin: half an example (``1 / (2 n)``) when n is known, else ``DEFAULT_EPS``."""
    if n is None:
        return DEFAULT_EPS
    n_arr = np.asarray(n, dtype=float)
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"test-set size n must be >= 1, got {n!r}")
    return 1.0 / (2.0 * n_arr)


def logit(p: float | Sequence[float] | np.ndarray, n: int | np.ndarray | None = None,
          eps: float | None = None) -> float | np.ndarray:
    """Log-odds of accuracies in [0, 1], clipped to ``[eps, 1 - eps]`` (see the module docstring).
    NaN stays NaN (a missing value); values outside [0, 1] are an error."""
    arr = np.asarray(p, dtype=float)
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"accuracies must be fractions in [0, 1] (76.1% -> 0.761); got values in "
                         f"[{finite.min():g}, {finite.max():g}]")
    e = np.asarray(clip_eps(n) if eps is None else eps, dtype=float)
    if np.any(e <= 0) or np.any(e >= 0.5):
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    q = np.clip(arr, e, 1 - e)
    out = np.log(q) - np.log1p(-q)
    return float(out) if out.ndim == 0 else out


def expit(x: float | np.ndarray) -> float | np.ndarray:
    """Inverse of ``logit`` (for axis labels in accuracy units)."""
    out = 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))
    return float(out) if np.ndim(out) == 0 else out


# ------------------------------------------------------------------ results table → matrices
def regimes_in(results: pd.DataFrame) -> list[str]:
    """The regimes of a results table, sorted (a stable order for tables and figures)."""
    return sorted(str(r) for r in pd.unique(results["regime"]))


def datasets_in(results: pd.DataFrame) -> list[str]:
    """Datasets in first-appearance order (the sweep file's order)."""
    return [str(d) for d in pd.unique(results["dataset"])]


def source_top1_by_model(results: pd.DataFrame) -> pd.Series:
    """One source top-1 per model (NaN if unknown). A model whose rows disagree is an error: its
    source accuracy is a property of the weights, not of the dataset or regime."""
    out = {}
    for model, g in results.groupby("model", sort=False):
        v = pd.to_numeric(g["source_top1"], errors="coerce").dropna().unique()
        if len(v) > 1 and np.ptp(v) > 1e-9:
            raise ValueError(f"source_top1 differs across rows of model {model!r}: {sorted(v.tolist())}; "
                             "it must be one value per model")
        out[str(model)] = float(v[0]) if len(v) else math.nan
    return pd.Series(out, name="source_top1", dtype=float)


def model_order(results: pd.DataFrame) -> list[str]:
    """Models by increasing source top-1 (unknown last), then by name: the paper's x-axis order."""
    src = source_top1_by_model(results)
    return sorted(src.index, key=lambda m: (math.isnan(src[m]), src[m] if not math.isnan(src[m]) else 0.0, m))


def _logit_rows(df: pd.DataFrame) -> np.ndarray:
    n = pd.to_numeric(df["n_test"], errors="coerce").to_numpy(float) if "n_test" in df.columns else None
    vals = pd.to_numeric(df["value"], errors="coerce").to_numpy(float)
    if n is None:
        return np.asarray(logit(vals), dtype=float)
    eps = np.where(np.isfinite(n) & (n >= 1), 1.0 / (2.0 * np.where(n >= 1, n, 1.0)), DEFAULT_EPS)
    return np.asarray(logit(vals, eps=eps), dtype=float)


def value_matrix(results: pd.DataFrame, regime: str, *, log_odds: bool = True) -> pd.DataFrame:
    """models × datasets for one regime (log-odds by default; NaN where a cell is missing), with every
    model and dataset of the whole table present so that missing cells stay visible."""
    df = results[results["regime"] == regime]
    vals = _logit_rows(df) if log_odds else pd.to_numeric(df["value"], errors="coerce").to_numpy(float)
    m = pd.DataFrame({"model": df["model"].astype(str).to_numpy(), "dataset": df["dataset"].astype(str).to_numpy(),
                      "v": vals})
    mat = m.pivot_table(index="model", columns="dataset", values="v", aggfunc="mean", dropna=False)
    return mat.reindex(index=model_order(results), columns=datasets_in(results))


def complete_block(matrix: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The largest complete (no-NaN) block, found greedily: repeatedly drop the model or dataset with the
    largest fraction of missing cells (ties: the one whose removal loses fewer observed cells, then
    datasets before models, then by name). Returns (block, dropped models, dropped datasets)."""
    m = matrix.copy()
    dropped_models: list[str] = []
    dropped_datasets: list[str] = []
    while m.size and m.isna().to_numpy().any():
        na = m.isna()
        cands = []
        for model, frac in na.mean(axis=1).items():
            cands.append((-frac, int((~na.loc[model]).sum()), 1, str(model), "model", model))
        for ds, frac in na.mean(axis=0).items():
            cands.append((-frac, int((~na[ds]).sum()), 0, str(ds), "dataset", ds))
        *_, kind, name = min(cands)
        if kind == "model":
            m = m.drop(index=name)
            dropped_models.append(str(name))
        else:
            m = m.drop(columns=name)
            dropped_datasets.append(str(name))
    return m, dropped_models, dropped_datasets


# ------------------------------------------------------------------ stand-ins and shared results
TRUE_WORDS = ("true", "1", "yes", "y", "t")


def stand_ins(results: pd.DataFrame) -> list[str]:
    """Models whose rows say ``stand_in`` (a bool, or true/1/yes as text); none without the column."""
    if "stand_in" not in results.columns:
        return []
    flag = results["stand_in"].map(lambda v: False if v is None or (isinstance(v, float) and math.isnan(v))
                                   else (bool(v) if isinstance(v, (bool, np.bool_, int, np.integer, float))
                                         else str(v).strip().lower() in TRUE_WORDS))
    return sorted({str(m) for m in results.loc[flag.astype(bool), "model"]})


def shared_groups(results: pd.DataFrame, regime: str, dataset: str | None = None) -> list[list[str]]:
    """Groups of models whose results in ``regime`` (on ``dataset``, or on any dataset) are one run:
    rows with the same non-empty ``run_id``. Groups chain (A shares with B on one dataset, B with C on
    another: one group). Every model of the regime is in exactly one group; singletons included, each
    group in ``model_order``."""
    df = results[results["regime"] == regime]
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    order = [m for m in model_order(results) if m in set(df["model"].astype(str))]
    parent = {m: m for m in order}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    if "run_id" in df.columns:
        ids = df["run_id"].map(lambda v: v.strip() if isinstance(v, str) else "")
        for _, g in df[ids != ""].groupby(ids[ids != ""], sort=False):
            members = [str(m) for m in g["model"]]
            for m in members[1:]:
                a, b = root(members[0]), root(m)
                if a != b:
                    parent[b] = a
    groups: dict[str, list[str]] = {}
    for m in order:
        groups.setdefault(root(m), []).append(m)
    return list(groups.values())


def point_label(members: Sequence[str]) -> str:
    """One point's label: its model, or the models sharing it (``a = b = c``)."""
    return " = ".join(members)


def collapse_shared(block: pd.DataFrame, source: pd.Series, groups: Sequence[Sequence[str]]
                    ) -> tuple[pd.DataFrame, pd.Series, dict[str, list[str]]]:
    """One row per group of ``block``'s models (models × datasets): the group's mean row (identical rows
    when the members share every result) at the mean of the members' source top-1. Groups are cut to
    the models in ``block``. Returns (points × datasets, x per point, point label → members)."""
    rows, xs, members = [], [], {}
    for g in groups:
        g = [m for m in g if m in block.index]
        if not g:
            continue
        label = point_label(g)
        rows.append(block.loc[g].mean(axis=0).rename(label))
        xs.append(float(source[g].mean()))
        members[label] = list(g)
    out = pd.DataFrame(rows, columns=block.columns)
    return out, pd.Series(xs, index=out.index, dtype=float, name="source_top1"), members


# ------------------------------------------------------------------ correlations
@dataclass(frozen=True)
class Correlation:
    """Pearson r (with its p-value and a bootstrap CI) and Spearman ρ (with its p-value) over n points."""

    r: float
    p: float
    ci_low: float
    ci_high: float
    rho: float
    rho_p: float
    n: int
    confidence: float = 0.95
    n_boot: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_pearson(x: np.ndarray, y: np.ndarray, *, n_boot: int = 10_000, seed: int = 0,
                      chunk: int = 2_000) -> np.ndarray:
    """Pearson r of ``n_boot`` resamples of the (x, y) pairs (with replacement). Resamples where x or
    y is constant have no r and come back NaN, and so do resamples of fewer than 3 distinct points:
    two points always correlate at exactly ±1, and with few models (a third of the resamples of 4)
    those would pin the interval to [-1, 1] whatever the data say."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        xb, yb = x[idx], y[idx]
        xc = xb - xb.mean(axis=1, keepdims=True)
        yc = yb - yb.mean(axis=1, keepdims=True)
        den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (xc * yc).sum(axis=1) / den
        # a resample with (numerically) constant x or y has no correlation
        tiny = den <= 1e-12 * max(1.0, float(np.abs(x).max() * np.abs(y).max()))
        srt = np.sort(idx, axis=1)
        distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
        out[start:start + len(r)] = np.where(tiny | (distinct < 3), np.nan, np.clip(r, -1.0, 1.0))
    return out


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, n_boot: int = 10_000,
              confidence: float = 0.95, seed: int = 0) -> Correlation:
    """Pearson r with a percentile bootstrap CI over points (seeded, so reports are reproducible),
    Spearman ρ, and both p-values (scipy). Fewer than 3 points, or a constant input, give NaNs."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    nan = math.nan
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(nan, nan, nan, nan, nan, nan, n, confidence, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = sps.pearsonr(x, y)
        sr = sps.spearmanr(x, y)
    lo = hi = nan
    if n_boot > 0:
        boot = bootstrap_pearson(x, y, n_boot=n_boot, seed=seed)
        if np.isfinite(boot).any():
            a = (1 - confidence) / 2 * 100
            lo, hi = (float(v) for v in np.nanpercentile(boot, [a, 100 - a]))
    return Correlation(float(pr.statistic), float(pr.pvalue), lo, hi, float(sr.statistic), float(sr.pvalue), n,
                       confidence, n_boot)


def _regime_headline(results: pd.DataFrame, regime: str, src: pd.Series, leave_out: Sequence[str], *,
                     n_boot: int, confidence: float, seed: int) -> dict[str, Any]:
    mat = value_matrix(results, regime)
    no_src = [m for m in mat.index if math.isnan(src.get(m, math.nan))]
    block, drop_m, drop_d = complete_block(mat.drop(index=[m for m in mat.index if m in no_src or m in leave_out]))
    points, x, members = collapse_shared(block, src, shared_groups(results, regime))
    mean = points.mean(axis=1)
    c = correlate(x.to_numpy(), mean.to_numpy(), n_boot=n_boot, confidence=confidence, seed=seed)
    return {"r": c.r, "ci": (c.ci_low, c.ci_high), "p": c.p, "rho": c.rho, "rho_p": c.rho_p,
            "n_models": c.n, "n_entries": block.shape[0], "n_datasets": block.shape[1], "confidence": confidence,
            "models": [str(m) for m in block.index], "datasets": [str(d) for d in block.columns],
            "points": {label: {"members": ms, "source_top1": float(x[label]), "mean_log_odds": float(mean[label])}
                       for label, ms in members.items()},
            "shared": {label: ms for label, ms in members.items() if len(ms) > 1},
            "excluded_models": {**{m: "no source top-1" for m in no_src},
                                **{m: "missing results" for m in drop_m}},
            "excluded_datasets": {d: "missing results" for d in drop_d}}


def headline(results: pd.DataFrame, *, n_boot: int = 10_000, confidence: float = 0.95,
             seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per regime: r between source top-1 and mean log-odds transfer accuracy, its bootstrap CI,
    Spearman ρ, the p-values, the counts and what the complete block left out. ``n_models`` counts
    points (a shared result once; ``n_entries`` counts model entries), ``points`` maps each point to its
    members, ``shared`` lists the points several entries share. When the table has stand-ins,
    ``without_stand_ins`` holds the same analysis without them (``stand_ins`` names them)."""
    src = source_top1_by_model(results)
    subs = stand_ins(results)
    out: dict[str, dict[str, Any]] = {}
    for regime in regimes_in(results):
        h = _regime_headline(results, regime, src, (), n_boot=n_boot, confidence=confidence, seed=seed)
        h["stand_ins"] = [m for m in h["models"] if m in subs]
        if subs:
            h["without_stand_ins"] = _regime_headline(results, regime, src, subs, n_boot=n_boot,
                                                      confidence=confidence, seed=seed)
        out[regime] = h
    return out


def per_dataset_correlations(results: pd.DataFrame, *, n_boot: int = 2_000, confidence: float = 0.95,
                             seed: int = 0) -> pd.DataFrame:
    """Per regime and dataset: r (with bootstrap CI) and ρ between source top-1 and log-odds accuracy,
    over the models that have both, a shared result counted once (``n_models`` counts points); when the
    table has stand-ins, ``r_without_stand_ins`` (and its ``n``) leaves them out."""
    src = source_top1_by_model(results)
    subs = stand_ins(results)
    rows = []
    for regime in regimes_in(results):
        mat = value_matrix(results, regime)
        for ds in mat.columns:
            col = mat[[ds]].dropna()
            col = col[src.reindex(col.index).notna()]
            groups = shared_groups(results, regime, ds)
            pts, x, _ = collapse_shared(col, src, groups)
            c = correlate(x.to_numpy(), pts[ds].to_numpy(), n_boot=n_boot, confidence=confidence, seed=seed)
            row = {"regime": regime, "dataset": ds, "r": c.r, "ci_low": c.ci_low, "ci_high": c.ci_high,
                   "p": c.p, "rho": c.rho, "rho_p": c.rho_p, "n_models": c.n}
            if subs:
                pts2, x2, _ = collapse_shared(col.drop(index=[m for m in subs if m in col.index]), src, groups)
                c2 = correlate(x2.to_numpy(), pts2[ds].to_numpy(), n_boot=0)
                row.update(r_without_stand_ins=c2.r, n_without_stand_ins=c2.n)
            rows.append(row)
    cols = ["regime", "dataset", "r", "ci_low", "ci_high", "p", "rho", "rho_p", "n_models"]
    return pd.DataFrame(rows, columns=cols + (["r_without_stand_ins", "n_without_stand_ins"] if subs else []))


def fit_line(x: np.ndarray, y: np.ndarray, grid: np.ndarray, confidence: float = 0.95
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares line through (x, y) evaluated on ``grid`` with a t-based confidence band for the
    mean response: ŷ ± t·s·sqrt(1/n + (g − x̄)² / Sxx). Returns (fit, low, high)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        raise ValueError(f"a fitted line with a band needs >= 3 points with distinct x, got {n}")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    s = math.sqrt(float(resid @ resid) / (n - 2))
    sxx = float(((x - x.mean()) ** 2).sum())
    t = sps.t.ppf(0.5 + confidence / 2, n - 2)
    fit = slope * grid + intercept
    half = t * s * np.sqrt(1.0 / n + (grid - x.mean()) ** 2 / sxx)
    return fit, fit - half, fit + half


# ------------------------------------------------------------------ within-subject intervals
def within_subject_intervals(matrix: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Morey (2008) within-subject intervals for each model (row) of a complete models × datasets matrix.

    Cousineau normalisation removes between-dataset differences: y'_md = y_md − mean_m'(y_m'd) + grand
    mean. Each model's interval is its mean ± t_{(1+c)/2, D−1} · sqrt(M/(M−1)) · sd_d(y'_md) / sqrt(D),
    with M models (the levels of the within-subject factor) and D datasets; the sqrt(M/(M−1)) factor
    is Morey's correction for the variance that the normalisation removes.
    """
    values = matrix.to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError("within-subject intervals need a complete models × datasets matrix; "
                         "use complete_block() first")
    m_count, d_count = values.shape
    if m_count < 2 or d_count < 2:
        raise ValueError(f"within-subject intervals need >= 2 models and >= 2 datasets, got {m_count} × {d_count}")
    normalised = values - values.mean(axis=0, keepdims=True) + values.mean()
    sd = normalised.std(axis=1, ddof=1)
    t = sps.t.ppf(0.5 + confidence / 2, d_count - 1)
    half = t * math.sqrt(m_count / (m_count - 1)) * sd / math.sqrt(d_count)
    mean = values.mean(axis=1)
    return pd.DataFrame({"mean": mean, "half_width": half, "low": mean - half, "high": mean + half,
                         "n_datasets": d_count}, index=matrix.index)


# ------------------------------------------------------------------ significance
def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, int, int]:
    """Two-sided exact McNemar test on paired per-example correctness: under H0 the discordant pairs
    split evenly, so p = min(1, 2·P[Binomial(b + c, 1/2) ≤ min(b, c)]). Returns (p, b, c) with b = only
    A right, c = only B right. No discordant pairs → p = 1."""
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-D and paired, got shapes {a.shape} and {b_.shape}")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    if b + c == 0:
        return 1.0, b, c
    p = min(1.0, 2.0 * float(sps.binom.cdf(min(b, c), b + c, 0.5)))
    return p, b, c


def paired_permutation_test(scores_a: np.ndarray, scores_b: np.ndarray, targets: np.ndarray, metric: MetricFn,
                            *, n_permutations: int = 1_000, seed: int = 0) -> tuple[float, float]:
    """Two-sided paired permutation test of metric(A) − metric(B) on the same examples: each
    permutation swaps the two models' predictions on a random half of the examples (a fair coin per
    example) and recomputes the metric, so it works for any metric (mean per-class accuracy, mAP).
    p = (1 + #{|d*| ≥ |d|}) / (1 + n_permutations). Returns (p, observed difference)."""
    sa = np.asarray(scores_a)
    sb = np.asarray(scores_b)
    if sa.shape != sb.shape or len(sa) != len(targets):
        raise ValueError(f"paired predictions must share a shape and the targets' length; got {sa.shape}, "
                         f"{sb.shape} and {len(targets)} targets")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    observed = metric(sa, targets) - metric(sb, targets)
    rng = np.random.default_rng(seed)
    extra = (1,) * (sa.ndim - 1)
    hits = 0
    tol = 1e-12 * max(1.0, abs(observed))
    for _ in range(n_permutations):
        swap = rng.random(len(sa)) < 0.5
        w = swap.reshape(-1, *extra)
        d = metric(np.where(w, sb, sa), targets) - metric(np.where(w, sa, sb), targets)
        hits += abs(d) >= abs(observed) - tol
    return (1 + hits) / (1 + n_permutations), float(observed)


def correct_top1(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-example top-1 correctness of single-label predictions."""
    return np.asarray(scores).argmax(axis=1) == np.asarray(targets).astype(int)


def _default_metric(name: str) -> MetricFn:
    from xfer.metrics import METRICS  # lazy: the report can run from a CSV without the training stack

    return METRICS.get(name)


def not_worse_than_best(results: pd.DataFrame, predictions: Predictions, *, alpha: float = ALPHA,
                        n_permutations: int = 1_000, seed: int = 0,
                        metric_fn: Callable[[str], MetricFn] | None = None) -> pd.DataFrame:
    """Per (regime, dataset): which models are not significantly worse than the best one (highest
    ``value``). Each model is tested against the best on per-example test predictions: exact McNemar
    for single-label top-1, else the paired permutation test on the dataset's metric. ``not_worse`` is
    True for the best model and for p ≥ alpha, False for p < alpha, and NA where a model (or the best)
    has no predictions. ``metric_fn(name)`` resolves a metric name (default: ``xfer.metrics.METRICS``)."""
    resolve = metric_fn or _default_metric
    rows = []
    for (regime, ds), g in results.groupby(["regime", "dataset"], sort=False):
        g = g[np.isfinite(pd.to_numeric(g["value"], errors="coerce"))]
        if g.empty:
            continue
        best_row = g.loc[pd.to_numeric(g["value"]).idxmax()]
        best = str(best_row["model"])
        best_pred = predictions.get((best, ds, regime))
        for _, row in g.iterrows():
            model = str(row["model"])
            rec = {"regime": regime, "dataset": ds, "model": model, "value": float(row["value"]), "best_model": best,
                   "is_best": model == best, "test": None, "p_value": math.nan, "not_worse": pd.NA}
            if model == best:
                rec["not_worse"] = True
            else:
                pred = predictions.get((model, ds, regime))
                if pred is not None and best_pred is not None:
                    (s_m, t_m), (s_b, t_b) = pred, best_pred
                    t_m, t_b = np.asarray(t_m), np.asarray(t_b)
                    if t_m.shape != t_b.shape or not np.array_equal(t_m, t_b):
                        raise ValueError(f"{regime} / {ds}: {model} and {best} were evaluated on different test "
                                         "examples (targets differ); predictions must be paired")
                    metric = str(row.get("metric") or "top1")
                    if metric == "top1" and t_b.ndim == 1:
                        p, _, _ = mcnemar_exact(correct_top1(s_m, t_b), correct_top1(s_b, t_b))
                        rec["test"] = "mcnemar_exact"
                    else:
                        p, _ = paired_permutation_test(s_m, s_b, t_b, resolve(metric),
                                                       n_permutations=n_permutations, seed=seed)
                        rec["test"] = f"permutation({metric})"
                    rec["p_value"] = p
                    rec["not_worse"] = bool(p >= alpha)
            rows.append(rec)
    out = pd.DataFrame(rows, columns=["regime", "dataset", "model", "value", "best_model", "is_best", "test",
                                      "p_value", "not_worse"])
    return out.astype({"is_best": bool, "not_worse": "boolean"})


# ------------------------------------------------------------------ regime comparison
def regime_comparison(results: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, model): each regime's accuracy and log-odds, and the log-odds differences between
    regimes (columns ``"<a> - <b>"`` for each pair in ``regimes_in`` order, e.g. finetune - scratch)."""
    regimes = regimes_in(results)
    df = results.assign(_logit=_logit_rows(results), value=pd.to_numeric(results["value"], errors="coerce"))
    acc = df.pivot_table(index=["dataset", "model"], columns="regime", values="value", aggfunc="mean",
                         dropna=False)
    lo = df.pivot_table(index=["dataset", "model"], columns="regime", values="_logit", aggfunc="mean",
                        dropna=False)
    idx = pd.MultiIndex.from_product([datasets_in(results), model_order(results)], names=["dataset", "model"])
    acc = acc.reindex(index=idx, columns=regimes)
    lo = lo.reindex(index=idx, columns=regimes)
    out = pd.DataFrame(index=idx)
    for r in regimes:
        out[f"acc_{r}"] = acc[r]
    for r in regimes:
        out[f"logit_{r}"] = lo[r]
    for i, a in enumerate(regimes):
        for b in regimes[i + 1:]:
            out[f"{a} - {b}"] = lo[a] - lo[b]
    return out.reset_index()
