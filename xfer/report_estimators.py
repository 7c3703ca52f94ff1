"""The report's estimator section: how well does each transferability estimator rank the models?

Input: the estimates table (``xfer.tracking.estimates.load_estimates``: one row per model × dataset ×
estimator with its score and compute seconds), the study's results table, and the grid's cost
(seconds per regime). Per dataset, across models, each estimator's scores — and plain source top-1, the
paper's predictor — are compared with the models' **fine-tuned** and **logistic-regression** test
accuracies by

* Pearson r against the log-odds test accuracy (the study's scale for accuracies), and
* weighted Kendall τ (``scipy.stats.weightedtau``, hyperbolic weights): a rank agreement in which
  swapping the best models costs more than swapping the worst — picking the best model is the use.

"Overall" is the mean of the per-dataset coefficients (an estimator's scores are not comparable across
datasets, so they are never pooled). The cost table sets each estimator's compute time beside the sum
of the grid trials' ``trial_seconds``. The statistics here are pure functions; ``build_section`` turns
them into report blocks and a figure, and ``write_files`` writes the figure and ``estimates.csv``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from xfer import stats

TARGET_REGIMES = ("finetune", "linear_probe")  # the rankings the estimators are meant to predict
SOURCE = "source top-1"  # the baseline predictor: the model's source accuracy, the same on every dataset
MEAN = "mean"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
BASELINE_COLOR = "#7f7f7f"


# ------------------------------------------------------------------ statistics (pure)
def agreement(score: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float, int]:
    """(Pearson r, weighted Kendall τ, n) of one predictor against accuracies, over the models where
    both are finite; NaN coefficients with fewer than 3 models or a constant side."""
    from scipy.stats import pearsonr, weightedtau

    s, a = np.asarray(score, dtype=float), np.asarray(accuracy, dtype=float)
    ok = np.isfinite(s) & np.isfinite(a)
    s, a = s[ok], a[ok]
    n = int(ok.sum())
    if n < 3 or np.ptp(s) == 0 or np.ptp(a) == 0:
        return math.nan, math.nan, n
    return float(pearsonr(s, a)[0]), float(weightedtau(s, a)[0]), n


def predictor_scores(estimates: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Long table (dataset, model, predictor, score): every estimator's score plus source top-1 for
    each model × dataset of ``results`` that has any estimate."""
    est = estimates[["dataset", "model", "estimator", "score"]].rename(columns={"estimator": "predictor"})
    src = stats.source_top1_by_model(results)
    pairs = est[["dataset", "model"]].drop_duplicates()
    base = pairs.assign(predictor=SOURCE, score=[src.get(m, math.nan) for m in pairs["model"]])
    return pd.concat([est, base], ignore_index=True)


def agreement_table(estimates: pd.DataFrame, results: pd.DataFrame,
                    regimes: Sequence[str] = TARGET_REGIMES) -> pd.DataFrame:
    """Rows (regime, dataset, predictor, r, tau_w, n_models) for each target regime in ``results``, per
    dataset and, as dataset ``mean``, averaged over the datasets where the coefficient is defined."""
    scores = predictor_scores(estimates, results)
    predictors = [p for p in sorted(set(scores["predictor"]) - {SOURCE})] + [SOURCE]
    rows = []
    for regime in [r for r in regimes if r in set(results["regime"])]:
        acc = stats.value_matrix(results, regime)  # models × datasets, log-odds
        per_regime = []
        for dataset in [d for d in stats.datasets_in(results) if d in set(scores["dataset"])]:
            for p in predictors:
                s = scores[(scores["dataset"] == dataset) & (scores["predictor"] == p)].set_index("model")["score"]
                if s.empty:
                    continue
                models = [m for m in s.index if m in acc.index]
                r, tau, n = agreement(s.loc[models].to_numpy(), acc.loc[models, dataset].to_numpy()
                                      if dataset in acc.columns else [math.nan] * len(models))
                per_regime.append({"regime": regime, "dataset": dataset, "predictor": p, "r": r, "tau_w": tau,
                                   "n_models": n})
        rows += per_regime
        df = pd.DataFrame(per_regime)
        for p in predictors:
            g = df[df["predictor"] == p] if not df.empty else df
            if g.empty:
                continue
            rows.append({"regime": regime, "dataset": MEAN, "predictor": p, "r": _mean(g["r"]),
                         "tau_w": _mean(g["tau_w"]), "n_models": int(g["n_models"].max()),
                         "n_datasets": int(np.isfinite(g["tau_w"].to_numpy(float)).sum())})
    return pd.DataFrame(rows, columns=["regime", "dataset", "predictor", "r", "tau_w", "n_models", "n_datasets"])


def _mean(x: pd.Series) -> float:
    v = x.to_numpy(float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def closest(table: pd.DataFrame, regime: str = "finetune", *, include_source: bool = False) -> tuple[str, float] | None:
    """The estimator with the highest mean weighted τ against ``regime`` (ties: higher mean r, then
    name), or None when no coefficient is defined."""
    g = table[(table["regime"] == regime) & (table["dataset"] == MEAN)]
    if not include_source:
        g = g[g["predictor"] != SOURCE]
    g = g[np.isfinite(g["tau_w"].to_numpy(float))]
    if g.empty:
        return None
    best = sorted(g.itertuples(index=False), key=lambda r: (-r.tau_w, -(r.r if math.isfinite(r.r) else -9), r.predictor))[0]
    return str(best.predictor), float(best.tau_w)


def cost_table(estimates: pd.DataFrame, grid_seconds: Mapping[str, float] | None) -> pd.DataFrame:
    """Seconds per estimator over all pairs — its own compute, plus the source-head predictions it
    reads (LEEP, NCE) — then the feature extraction they share with the probe, and the grid per regime."""
    rows = []
    pairs = estimates.drop_duplicates(["model", "dataset"])
    source = float(np.nansum(pairs["source_seconds"].to_numpy(float)))
    for name, g in estimates.groupby("estimator", sort=True):
        own = float(np.nansum(g["seconds"].to_numpy(float)))
        shared = source if bool(g["needs_source"].any()) else 0.0
        rows.append({"what": f"estimator {name}", "seconds": own + shared, "note":
                     f"{own:.3g}s scoring + {shared:.3g}s source-head predictions" if shared else "scoring only",
                     "pairs": int(len(g))})
    rows.append({"what": "feature extraction", "seconds": float(np.nansum(pairs["features_seconds"].to_numpy(float))),
                 "note": "frozen features, shared by every estimator and the linear probe", "pairs": int(len(pairs))})
    for regime, sec in (grid_seconds or {}).items():
        rows.append({"what": f"grid: {regime}", "seconds": float(sec), "note": "sum of trial_seconds", "pairs": None})
    if grid_seconds:
        rows.append({"what": "grid: all regimes", "seconds": float(sum(grid_seconds.values())),
                     "note": "sum of trial_seconds", "pairs": None})
    out = pd.DataFrame(rows, columns=["what", "seconds", "pairs", "note"])
    out["pairs"] = out["pairs"].astype("Int64")  # a count; blank for the grid rows
    return out


# ------------------------------------------------------------------ figure + blocks
def plot_agreement(table: pd.DataFrame) -> Any:
    """Weighted τ per dataset (and the mean) for each predictor, one panel per target regime."""
    from matplotlib.figure import Figure

    regimes = list(dict.fromkeys(table["regime"]))
    preds = list(dict.fromkeys(table["predictor"]))
    datasets = list(dict.fromkeys(table["dataset"]))
    fig = Figure(figsize=(max(6.0, 1.3 * len(datasets) * max(1, len(regimes))), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(regimes)), squeeze=False, sharey=True)[0]
    width = 0.8 / max(1, len(preds))
    for ax, regime in zip(axes, regimes):
        g = table[table["regime"] == regime]
        for j, p in enumerate(preds):
            vals = [g[(g["dataset"] == d) & (g["predictor"] == p)]["tau_w"].mean() for d in datasets]
            color = BASELINE_COLOR if p == SOURCE else COLORS[j % len(COLORS)]
            ax.bar(np.arange(len(datasets)) + (j - (len(preds) - 1) / 2) * width, np.nan_to_num(vals), width,
                   label=p, color=color, hatch="//" if p == SOURCE else None, edgecolor="white", lw=0.3)
        ax.axhline(0, color="#444", lw=0.8)
        ax.set_xticks(np.arange(len(datasets)), datasets, rotation=20, fontsize=8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"ranking by {regime} test accuracy", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("weighted Kendall τ")
    axes[-1].legend(fontsize=7, loc="lower right")
    return fig


@dataclass
class Section:
    """The section as blocks (``("h", text)``, ``("p", text)``, ``("table", df)``, ``("img", name)``),
    its figures (name → (figure, caption)) and its tables for the CSV files."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, tuple[Any, str]] = field(default_factory=dict)
    agreement: pd.DataFrame | None = None
    estimates: pd.DataFrame | None = None
    closest: dict[str, Any] = field(default_factory=dict)

    def render(self, doc: Any, files: Mapping[str, Path]) -> None:
        """Append to a report document with ``h``, ``p``, ``table`` and ``img`` methods."""
        for kind, x in self.blocks:
            if kind == "img":
                doc.img(files[x], self.figures[x][1])
            else:
                getattr(doc, kind)(x)


def build_section(estimates: pd.DataFrame, results: pd.DataFrame,
                  grid_seconds: Mapping[str, float] | None = None) -> Section:
    """The estimator section of a report (see the module docstring)."""
    sec = Section(estimates=estimates)
    sec.blocks.append(("h", "Transferability estimators: ranking models without training"))
    names = sorted(set(estimates["estimator"]))
    table = agreement_table(estimates, results)
    sec.agreement = table
    if table.empty:
        sec.blocks.append(("p", f"Estimates ({', '.join(names)}) exist, but the results have no "
                                f"{' or '.join(TARGET_REGIMES)} regime to rank against."))
        return sec
    sec.blocks.append(("p", f"Each estimator ({', '.join(names)}) scored every model on each dataset's train+val "
                            "split from the frozen features (LEEP and NCE from the source head's predictions), with "
                            "no training. Per dataset, across models: Pearson r between the score and the log-odds "
                            "test accuracy, and weighted Kendall τ (hyperbolic weights: the top of the ranking "
                            f"counts most). '{SOURCE}' is the baseline that ranks models by source accuracy alone. "
                            f"'{MEAN}': the average over datasets."))
    overall = table[table["dataset"] == MEAN].pivot_table(index="predictor", columns="regime", values=["tau_w", "r"],
                                                           aggfunc="first")
    overall.columns = [f"{'τ_w' if s == 'tau_w' else 'r'} {reg}" for s, reg in overall.columns]
    order = [c for reg in TARGET_REGIMES for c in (f"τ_w {reg}", f"r {reg}") if c in overall.columns]
    sec.blocks.append(("table", overall[order].reset_index()))
    lines = []
    for regime in [r for r in TARGET_REGIMES if r in set(table["regime"])]:
        best = closest(table, regime)
        src = table[(table["regime"] == regime) & (table["dataset"] == MEAN) & (table["predictor"] == SOURCE)]
        src_tau = float(src["tau_w"].iloc[0]) if len(src) else math.nan
        if best:
            sec.closest[regime] = {"estimator": best[0], "tau_w": best[1], "source_top1_tau_w": src_tau}
            lines.append(f"{regime}: {best[0]} ranked the models closest (mean τ_w = {best[1]:.2f}; "
                         f"source top-1: {src_tau:.2f})")
    if lines:
        sec.blocks.append(("p", "Closest to each ranking — " + "; ".join(lines) + "."))
    sec.figures["fig_estimators"] = (plot_agreement(table), "Weighted Kendall τ between each predictor's scores "
                                     "and the models' test accuracy, per dataset and on average.")
    sec.blocks.append(("img", "fig_estimators"))
    detail = table[table["dataset"] != MEAN][["regime", "dataset", "predictor", "r", "tau_w", "n_models"]]
    sec.blocks.append(("p", "Per dataset:"))
    sec.blocks.append(("table", detail.rename(columns={"tau_w": "τ_w", "n_models": "models"})))
    cost = cost_table(estimates, grid_seconds)
    sec.blocks.append(("p", "Cost: seconds summed over all (model, dataset) pairs, next to the grid search the "
                            "estimators would replace (estimates.csv has every score)."))
    sec.blocks.append(("table", cost))
    return sec


def write_files(sec: Section, out: Path) -> dict[str, Path]:
    """Write the section's figures and ``estimates.csv`` / ``estimator_agreement.csv`` into ``out``."""
    files: dict[str, Path] = {}
    for name, (fig, _) in sec.figures.items():
        fig.savefig(out / f"{name}.png", dpi=130)
        files[name] = out / f"{name}.png"
    if sec.estimates is not None:
        sec.estimates.to_csv(out / "estimates.csv", index=False)
        files["estimates_csv"] = out / "estimates.csv"
    if sec.agreement is not None:
        sec.agreement.to_csv(out / "estimator_agreement.csv", index=False)
        files["estimator_agreement_csv"] = out / "estimator_agreement.csv"
    (out / "estimators.json").write_text(json.dumps(_json_safe({"closest": sec.closest}), indent=2))
    files["estimators_json"] = out / "estimators.json"
    return files


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
