"""The study report: tables, figures and the report files (the only analysis module that writes).

``build_report(results, out_dir)`` takes a results table (one row per model × dataset × regime:
model, dataset, regime, source_top1, metric, value; fractions in [0, 1]) and writes

* ``report.md`` (figures linked as PNG files next to it) and a self-contained ``report.html``
  (figures embedded as base64 data URIs; no external resources),
* ``results.csv`` (the table it analysed, readable back with ``read_results_csv``),
* ``headline.json`` (per regime: r, its CI, Spearman ρ, counts — what the sweep prints),
* PNG figures: source top-1 vs mean log-odds transfer accuracy per regime (the paper's Figure 2),
  per-dataset panels, the regime comparison (Figure 3-like), and per-regime heat maps with the
  "not significantly worse than the best" cells outlined (needs per-example ``predictions``).

Stand-ins and shared results are in the open: a table with ``stand_in`` / ``paper_name`` columns gets
a models section naming each stand-in and the paper model it stands for, stand-ins drawn as open
markers (and marked * in figures and tables), and every headline r twice — with and without them. Rows that
share a ``run_id`` (a random-init trial several entries of one architecture share) are one point of
each correlation, labelled with every entry that shares it. ``input_size`` / ``source_input_size``
flag models whose source top-1 was measured at another resolution than the one they ran at;
``solver_converged`` / ``n_grid_unconverged`` count fits whose solver did not pass its convergence test.

The statistics are in ``xfer.stats`` (see its docstring for the log-odds clipping, the bootstrap, the
within-subject intervals and the significance tests).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from xfer import report_curves, stats
from xfer.regimes import REGIMES

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["model", "dataset", "regime", "source_top1", "metric", "value"]
MODEL_COLUMNS = ["paper_name", "stand_in", "input_size", "source_input_size"]  # one value per model
OPTIONAL_COLUMNS = ["run_id", "val", "n_test", "status", "note", "n_seeds", *MODEL_COLUMNS, "solver_converged",
                    "n_grid_unconverged", "<grid axes, e.g. lr, wd, l2>"]
FRACTION_COLUMNS = ["source_top1", "value", "val"]
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
DPI = 130
OUTLINE = "#f76707"  # orange: visible on both ends of the heat map's colour scale
STAND_IN_MARK = "*"


def regime_label(regime: str) -> str:
    """The regime's own report label (its descriptor), or its name when it is not registered."""
    return REGIMES.get(regime).label if regime in REGIMES else regime


def regime_color(regime: str) -> str:
    names = REGIMES.names()
    return PALETTE[names.index(regime) % len(PALETTE)] if regime in names else "#444"


class ResultsTableError(ValueError):
    """A results table that cannot be analysed; the message says what is wrong and what is valid."""


# ------------------------------------------------------------------ reading / validating the table
def _fraction_column(df: pd.DataFrame, col: str, source: str, allow_percent: bool) -> pd.Series:
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce")
    bad = raw.notna() & (raw.astype(str).str.strip() != "") & vals.isna()
    if bad.any():
        examples = ", ".join(repr(v) for v in raw[bad].head(3))
        raise ResultsTableError(f"{source}: column {col!r} has non-numeric values ({examples}); "
                                "expected numbers (fractions in [0, 1]) or empty for missing")
    finite = vals[np.isfinite(vals)]
    if finite.empty or ((finite >= 0) & (finite <= 1)).all():
        return vals
    if allow_percent and ((finite > 1) & (finite <= 100)).all():
        log.info("%s: column %r looks like percentages (all values in (1, 100]); dividing by 100", source, col)
        return vals / 100.0
    lo, hi = float(finite.min()), float(finite.max())
    hint = (" (fractions and percentages mixed? percentages are accepted only when every value is in (1, 100])"
            if allow_percent and lo >= 0 and hi <= 100 else "")
    raise ResultsTableError(f"{source}: column {col!r} must hold fractions in [0, 1]"
                            f"{' or percentages in (1, 100]' if allow_percent else ''}; found values in "
                            f"[{lo:g}, {hi:g}]{hint}")


def _numeric_column(df: pd.DataFrame, col: str, source: str) -> pd.Series:
    vals = pd.to_numeric(df[col], errors="coerce")
    bad = df[col].notna() & (df[col].astype(str).str.strip() != "") & vals.isna()
    if bad.any():
        raise ResultsTableError(f"{source}: column {col!r} has non-numeric values "
                                f"({', '.join(repr(v) for v in df.loc[bad, col].head(3))}); expected numbers or empty")
    return vals


def _bool_column(df: pd.DataFrame, col: str, source: str) -> pd.Series:
    """true/false (any case), 1/0, yes/no or a bool; empty is false (the model is what its name says)."""
    def parse(v: Any) -> bool | None:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        t = str(v).strip().lower()
        if t in ("", "false", "0", "0.0", "no", "n", "f"):
            return False
        return True if t in stats.TRUE_WORDS or t == "1.0" else None

    parsed = df[col].map(parse)
    bad = parsed.isna()
    if bad.any():
        raise ResultsTableError(f"{source}: column {col!r} must be true or false (or empty), got "
                                f"{', '.join(repr(v) for v in df.loc[bad, col].head(3))}")
    return parsed.astype(bool)


def validate_results(df: pd.DataFrame, *, source: str = "results table", allow_percent: bool = False
                     ) -> pd.DataFrame:
    """Check a results table and return a clean copy (numeric fractions, string keys, no duplicate cells).

    ``allow_percent``: a fraction column whose values all lie in (1, 100] is read as percentages
    (divided by 100, with a logged note); mixed or out-of-range values are an error.
    """
    if not isinstance(df, pd.DataFrame):
        raise ResultsTableError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsTableError(
            f"{source}: missing required column(s) {', '.join(missing)}. Required: {', '.join(REQUIRED_COLUMNS)}; "
            f"optional: {', '.join(OPTIONAL_COLUMNS)}; found: {', '.join(map(str, df.columns)) or '(none)'}")
    if df.empty:
        raise ResultsTableError(f"{source}: the table has no rows")
    out = df.copy()
    for c in ("model", "dataset", "regime"):
        blank = out[c].isna() | (out[c].astype(str).str.strip() == "")
        if blank.any():
            raise ResultsTableError(f"{source}: column {c!r} is empty in row(s) "
                                    f"{', '.join(str(i) for i in out.index[blank][:5])}; every row needs a "
                                    "model, dataset and regime")
        out[c] = out[c].astype(str).str.strip()
    out["metric"] = out["metric"].where(out["metric"].notna(), "").astype(str).str.strip()
    from xfer.metrics import METRICS

    unknown = sorted(set(out["metric"]) - set(METRICS.names()) - {""})  # blank: a cell without a result
    if unknown:  # the log-odds analysis and the significance tests depend on what the metric is
        raise ResultsTableError(f"{source}: column 'metric' has unknown value(s) {', '.join(map(repr, unknown[:5]))}; "
                                f"valid: {', '.join(METRICS.names())}")
    for c in FRACTION_COLUMNS:
        if c in out.columns:
            out[c] = _fraction_column(out, c, source, allow_percent)
    for c in ("n_test", "input_size", "source_input_size", "solver_converged", "n_grid_unconverged"):
        if c in out.columns:
            out[c] = _numeric_column(out, c, source)
    if "stand_in" in out.columns:
        out["stand_in"] = _bool_column(out, "stand_in", source)
    if "paper_name" in out.columns:
        out["paper_name"] = out["paper_name"].map(lambda v: v.strip() if isinstance(v, str) else "")
    for c in ("paper_name", "stand_in", "input_size", "source_input_size"):
        if c in out.columns:
            counts = out.groupby("model", sort=False)[c].nunique(dropna=True)
            if (counts > 1).any():
                m = counts[counts > 1].index[0]
                raise ResultsTableError(f"{source}: column {c!r} differs across rows of model {m!r} "
                                        f"({sorted(map(str, out.loc[out.model == m, c].unique()))}); it describes "
                                        "the model entry and must be one value per model")
    cell_axes = report_curves.cell_axis_columns(out)  # schedule, train_size: each value is a cell of its own
    dup = out.duplicated(["model", "dataset", "regime", *cell_axes], keep=False)
    if dup.any():
        cells = out.loc[dup, ["model", "dataset", "regime"]].drop_duplicates().head(5)
        listed = "; ".join(" / ".join(r) for r in cells.itertuples(index=False))
        raise ResultsTableError(f"{source}: more than one row for the same (model, dataset, regime"
                                f"{''.join(', ' + c for c in cell_axes)}): {listed}; a results table has one row per "
                                "cell")
    if report_curves.main_cells(out).empty:
        raise ResultsTableError(f"{source}: no row has every cell axis ({', '.join(cell_axes)}) at its default; the "
                                "main analysis compares models there")
    try:
        stats.source_top1_by_model(out)
    except ValueError as e:
        raise ResultsTableError(f"{source}: {e}") from None
    return out.reset_index(drop=True)


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """Read a results table from CSV (the ``xfer report --from-csv`` format) and validate it.
    Required columns: model, dataset, regime, source_top1, metric, value; optional: the grid axes (lr, wd, l2, ...), run_id,
    val, n_test (test-set size, used for the log-odds clipping), status, note. Accuracies are fractions in
    [0, 1]; a column whose values all lie in (1, 100] is taken as percentages (with a logged note)."""
    p = Path(path)
    if not p.is_file():
        raise ResultsTableError(f"{p}: no such results file")
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ResultsTableError(f"{p}: not a readable CSV file: {e}") from None
    return validate_results(df, source=str(p), allow_percent=True)


# ------------------------------------------------------------------ figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _fmt_r(h: Mapping[str, Any]) -> str:
    if h["n_models"] < 3 or not np.isfinite(h["r"]):
        return f"r n/a ({h['n_models']} models)"
    lo, hi = h["ci"]
    ci = f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else ""
    return f"r = {h['r']:.2f}{ci}, ρ = {h['rho']:.2f} (n = {h['n_models']})"


def _accuracy_axis(ax) -> None:
    """A right-hand axis in accuracy (%) for a log-odds y-axis."""
    def to_pct(x):
        return 100.0 * stats.expit(x)

    def to_logit(p):
        return stats.logit(np.clip(np.asarray(p, float) / 100.0, 0.0, 1.0), eps=1e-9)

    sec = ax.secondary_yaxis("right", functions=(to_pct, to_logit))
    sec.set_ylabel("accuracy (%)")


def _scatter_fit(ax, x: np.ndarray, y: np.ndarray, labels: Sequence[str] | None, color: str,
                 yerr: np.ndarray | None = None, fontsize: float = 7.5, hollow: np.ndarray | None = None) -> None:
    """Points (open markers where ``hollow``: stand-ins), the least-squares line over all of them and
    its 95% band, and non-overlapping labels."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    hollow = np.zeros(len(x), bool) if hollow is None else np.asarray(hollow, bool)
    for mask, face in ((~hollow, color), (hollow, "white")):
        if not mask.any():
            continue
        if yerr is not None:
            ax.errorbar(x[mask], y[mask], yerr=np.asarray(yerr)[mask], fmt="o", color=color, mfc=face, mew=1.3,
                        ms=5, capsize=2, lw=1, zorder=3)
        else:
            ax.plot(x[mask], y[mask], "o", color=color, mfc=face, mew=1.3, ms=5, zorder=3)
    if len(x) >= 3 and np.ptp(x) > 0:
        grid = np.linspace(x.min(), x.max(), 100)
        fit, lo, hi = stats.fit_line(x, y, grid)
        ax.plot(grid, fit, "-", color=color, lw=1.2, alpha=0.9)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0, label="95% confidence band")
    if labels is not None:
        ax.margins(x=0.12, y=0.08)
        _place_labels(ax, x, y, labels, fontsize)
    ax.grid(True, alpha=0.3)


def _points(results: pd.DataFrame, regime: str, h: Mapping[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                             np.ndarray]:
    """A headline's points: labels (stand-ins marked †), x (source top-1, %), mean log-odds, and which
    points are stand-ins (every entry sharing the point is one)."""
    subs = set(stats.stand_ins(results))
    pts = h["points"]
    labels = [_mark(label, all(m in subs for m in p["members"])) for label, p in pts.items()]
    x = np.array([100 * p["source_top1"] for p in pts.values()], float)
    y = np.array([p["mean_log_odds"] for p in pts.values()], float)
    hollow = np.array([all(m in subs for m in p["members"]) for p in pts.values()], bool)
    return labels, x, y, hollow


def _mark(label: str, stand_in: bool) -> str:
    return f"{label} {STAND_IN_MARK}" if stand_in else label


def _place_labels(ax, x: np.ndarray, y: np.ndarray, labels: Sequence[str], fontsize: float) -> None:
    """Label points without piling labels on each other: for each point (left to right) take the first
    of a few offsets whose text box overlaps no placed label and no other point (approximate boxes in
    axes-fraction units; good enough for a few dozen models)."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    bbox = ax.get_window_extent()
    w_px, h_px = max(bbox.width, 1.0), max(bbox.height, 1.0)
    pt = ax.figure.dpi / 72.0
    fx = (np.asarray(x) - x0) / (x1 - x0)
    fy = (np.asarray(y) - y0) / (y1 - y0)
    ch_w, ch_h = 0.6 * fontsize * pt / w_px, 1.25 * fontsize * pt / h_px
    off_x, off_y = 4 * pt / w_px, 3 * pt / h_px
    placed: list[tuple[float, float, float, float]] = []

    def overlap(b, c) -> float:
        return max(0.0, min(b[2], c[2]) - max(b[0], c[0])) * max(0.0, min(b[3], c[3]) - max(b[1], c[1]))

    for i in np.argsort(fx, kind="mergesort"):
        w = ch_w * len(labels[i])
        cands = [(off_x, off_y), (off_x, -off_y - ch_h), (-off_x - w, off_y), (-off_x - w, -off_y - ch_h),
                 (off_x, 3 * off_y + ch_h), (off_x, -3 * off_y - 2 * ch_h)]
        best, best_cost = cands[0], math.inf
        for dx, dy in cands:
            box = (fx[i] + dx, fy[i] + dy, fx[i] + dx + w, fy[i] + dy + ch_h)
            cost = sum(overlap(box, b) for b in placed)
            cost += sum(overlap(box, (fx[j] - 0.01, fy[j] - 0.01, fx[j] + 0.01, fy[j] + 0.01))
                        for j in range(len(fx)) if j != i)
            cost += 10 * max(0.0, box[2] - 1.0) + 10 * max(0.0, -box[0])  # stay inside the axes
            if cost < best_cost - 1e-12:
                best, best_cost = (dx, dy), cost
            if cost == 0:
                break
        dx, dy = best
        placed.append((fx[i] + dx, fy[i] + dy, fx[i] + dx + w, fy[i] + dy + ch_h))
        ax.annotate(labels[i], (x[i], y[i]), xytext=(dx * w_px / pt, dy * h_px / pt), textcoords="offset points",
                    fontsize=fontsize, color="#333", va="bottom", ha="left")


def plot_correlation(results: pd.DataFrame, head: Mapping[str, Mapping[str, Any]],
                     intervals: Mapping[str, pd.DataFrame], title: str) -> Any:
    """Per regime: source top-1 vs mean log-odds transfer accuracy, with Morey error bars, the
    least-squares line and its 95% confidence band; r, its CI and ρ in the panel title (and r without
    stand-ins when there are any). Stand-ins are open markers marked †; a result several entries share
    is one point labelled with all of them."""
    regimes = list(head)
    fig = _figure(5.2 * len(regimes), 4.8)
    axes = fig.subplots(1, len(regimes), squeeze=False)[0]
    for ax, regime in zip(axes, regimes):
        h = head[regime]
        iv = intervals.get(regime)
        color = regime_color(regime)
        if h["points"]:
            labels, x, y, hollow = _points(results, regime, h)
            yerr = iv.loc[list(h["points"]), "half_width"].to_numpy() if iv is not None else None
            _scatter_fit(ax, x, y, labels, color, yerr, hollow=hollow)
        else:
            ax.text(0.5, 0.5, "no complete results", ha="center", va="center", transform=ax.transAxes)
        sub = f"\nwithout stand-ins: {_fmt_r(h['without_stand_ins'])}" if "without_stand_ins" in h else ""
        ax.set_title(f"{regime_label(regime)}\n{_fmt_r(h)}{sub}", fontsize=10)
        ax.set_xlabel("source-task (e.g. ImageNet) top-1 accuracy (%)")
        ax.set_ylabel(f"mean transfer accuracy (log odds)\nover {h['n_datasets']} datasets")
        _accuracy_axis(ax)
    fig.suptitle(title, fontsize=12)
    return fig


def plot_per_dataset(results: pd.DataFrame, regime: str, per_dataset: pd.DataFrame) -> Any:
    """Small multiples: one panel per dataset, source top-1 vs log-odds accuracy of each model (a shared
    result once, stand-ins as open markers)."""
    mat = stats.value_matrix(results, regime)
    src = stats.source_top1_by_model(results)
    subs = set(stats.stand_ins(results))
    datasets = list(mat.columns)
    ncols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = _figure(3.6 * ncols, 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    color = regime_color(regime)
    pd_r = per_dataset[per_dataset["regime"] == regime].set_index("dataset")
    for i, ax in enumerate(axes.flat):
        if i >= len(datasets):
            ax.set_visible(False)
            continue
        ds = datasets[i]
        y = mat[ds]
        ok = y.notna() & src.reindex(y.index).notna()
        pts, x, members = stats.collapse_shared(mat.loc[ok, [ds]], src, stats.shared_groups(results, regime, ds))
        hollow = np.array([all(m in subs for m in members[label]) for label in pts.index], bool)
        _scatter_fit(ax, x.to_numpy() * 100, pts[ds].to_numpy(), None, color, hollow=hollow)
        r = pd_r.loc[ds, "r"] if ds in pd_r.index else math.nan
        miss = int((~ok).sum())
        rtxt = f"r = {r:.2f}" if np.isfinite(r) else "r n/a"
        if "r_without_stand_ins" in pd_r.columns and ds in pd_r.index and np.isfinite(pd_r.loc[ds, "r_without_stand_ins"]):
            rtxt += f" ({pd_r.loc[ds, 'r_without_stand_ins']:.2f} w/o {STAND_IN_MARK})"
        ax.set_title(f"{ds}: {rtxt}" + (f" ({miss} missing)" if miss else ""), fontsize=9.5)
        if i % ncols == 0:
            ax.set_ylabel("accuracy (log odds)")
        if i // ncols == nrows - 1 or i + ncols >= len(datasets):
            ax.set_xlabel("source top-1 (%)")
    fig.suptitle(f"{regime_label(regime)}: per-dataset transfer vs source accuracy", fontsize=11)
    return fig


def plot_regime_comparison(results: pd.DataFrame) -> Any:
    """Per dataset: each model's test accuracy under each regime (models ordered by source top-1)."""
    comp = stats.regime_comparison(results)
    regimes = stats.regimes_in(results)
    datasets = stats.datasets_in(results)
    models = stats.model_order(results)
    ncols = min(4 if len(models) <= 10 else 3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = _figure(max(3.6, 0.22 * len(models) + 1.6) * ncols, 3.0 * nrows + 1.2)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    xs = np.arange(len(models))
    for i, ax in enumerate(axes.flat):
        if i >= len(datasets):
            ax.set_visible(False)
            continue
        ds = datasets[i]
        sub = comp[comp["dataset"] == ds].set_index("model").reindex(models)
        for regime in regimes:
            y = sub[f"acc_{regime}"].to_numpy(float) * 100
            line, = ax.plot(xs, y, "o-", ms=4, lw=1, color=regime_color(regime),
                            label=regime_label(regime))
            gone = ~np.isfinite(y)
            if gone.any():  # missing results stay visible: a cross on the x-axis in the regime's colour
                ax.plot(xs[gone], np.full(gone.sum(), 0.03), "x", ms=7, mew=2, color=line.get_color(),
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_title(ds, fontsize=10)
        ax.set_xticks(xs)
        bottom = i + ncols >= len(datasets)
        ax.set_xticklabels(models if bottom else [], rotation=60, ha="right", fontsize=8)
        if i % ncols == 0:
            ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(regimes), fontsize=9)
    fig.suptitle("Regime comparison per dataset (models ordered by source top-1 →; × on the axis: missing result)",
                 fontsize=11)
    return fig


def plot_heatmap(results: pd.DataFrame, regime: str, significance: pd.DataFrame | None,
                 alpha: float = stats.ALPHA) -> Any:
    """models × datasets accuracy (%) for one regime. Colour: log-odds standardised within each dataset
    (datasets differ in difficulty); bold: best per dataset; outlined: not significantly worse than
    the best; grey hatched: missing."""
    from matplotlib.patches import Rectangle

    acc = stats.value_matrix(results, regime, log_odds=False)
    lo = stats.value_matrix(results, regime)
    models = list(reversed(stats.model_order(results)))  # best source accuracy on top
    acc, lo = acc.loc[models], lo.loc[models]
    src = stats.source_top1_by_model(results)
    z = (lo - lo.mean(axis=0)) / lo.std(axis=0, ddof=0).replace(0, np.nan)
    z = z.where(lo.notna())
    z = z.fillna(0.0).where(lo.notna())
    n_m, n_d = acc.shape
    fig = _figure(1.05 * n_d + 3.2, 0.42 * n_m + 2.2)
    ax = fig.subplots()
    data = np.ma.masked_invalid(z.to_numpy(float))
    import matplotlib

    cmap = matplotlib.colormaps["YlGnBu"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(data, cmap=cmap, vmin=-2, vmax=2, aspect="auto")
    sig = None
    tested: set[str] = set()  # datasets where at least one model was tested against the best
    if significance is not None and not significance.empty:
        sub = significance[significance["regime"] == regime]
        tested = {str(d) for d in sub.loc[sub["test"].notna(), "dataset"]}
        sig = sub.set_index(["model", "dataset"])
    for i, m in enumerate(models):
        for j, ds in enumerate(acc.columns):
            v = acc.iat[i, j]
            if not np.isfinite(v):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#999", lw=0))
                ax.text(j, i, "missing", ha="center", va="center", fontsize=7.5, color="#555")
                continue
            zz = data[i, j]
            weight = "normal"
            if np.nanmax(acc[ds].to_numpy(float)) == v:
                weight = "bold"
            if sig is not None and ds in tested and (m, ds) in sig.index:
                s = sig.loc[(m, ds)]
                if not pd.isna(s["not_worse"]) and bool(s["not_worse"]):
                    ax.add_patch(Rectangle((j - 0.44, i - 0.42), 0.88, 0.84, fill=False, edgecolor=OUTLINE, lw=2.4))
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=8.5, fontweight=weight,
                    color="white" if float(zz) > 0.9 else "black")
    ax.set_xticks(range(n_d))
    untested = sig is not None and any(ds not in tested for ds in acc.columns)
    ax.set_xticklabels([f"{ds} †" if untested and ds not in tested else ds for ds in acc.columns],
                       rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(n_m))
    subs = set(stats.stand_ins(results))
    ax.set_yticklabels([_mark(f"{m} ({100 * src[m]:.1f}%)" if np.isfinite(src[m]) else f"{m} (n/a)", m in subs)
                        for m in models], fontsize=9)
    ax.set_ylabel("model (source top-1)")
    ax.set_xlabel("dataset")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("log odds, standardised per dataset (z)")
    if sig is None:
        note = "bold: best; significance not tested (no per-example predictions)"
    else:
        note = f"bold: best; orange outline: not significantly worse than the best (α = {alpha:g})"
        note += "; † no per-example predictions, not tested" if untested else ""
    if subs:
        note += f"\nmodel {STAND_IN_MARK}: stand-in (other weights under the paper model's name)"
    ax.set_title(f"{regime_label(regime)}: test accuracy (%)\n{note}", fontsize=10)
    return fig


# ------------------------------------------------------------------ documents (markdown + html)
def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or (v is pd.NA):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if pct:
            return f"{100 * float(v):.1f}"
        f = float(v)
        return f"{f:.{digits}g}" if (abs(f) < 1e-3 and f != 0) else f"{f:.{digits}f}"
    return str(v)


@dataclass
class _Doc:
    """A report as a list of blocks, rendered to both markdown and html."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, pct: Sequence[str] = ()) -> None:
        shown = pd.DataFrame({c: [_fmt(v, c in pct) for v in df[c]] for c in df.columns}, columns=df.columns)
        self.blocks.append(("table", shown))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, x in self.blocks:
            if kind == "h2":
                out += [f"## {x}", ""]
            elif kind == "p":
                out += [x, ""]
            elif kind == "table":
                cols = [str(c) for c in x.columns]
                out.append("| " + " | ".join(cols) + " |")
                out.append("|" + "|".join("---" for _ in cols) + "|")
                for row in x.itertuples(index=False):
                    out.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
                out.append("")
            elif kind == "img":
                path, caption = x
                out += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
               "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
               "td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto}"
               "figure{margin:1em 0 2em}figcaption{font-style:italic;color:#555}")
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{css}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(x)}</h2>")
            elif kind == "p":
                out.append(f"<p>{html.escape(x)}</p>")
            elif kind == "table":
                out.append(x.to_html(index=False, escape=True, border=0))
            elif kind == "img":
                path, caption = x
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


# ------------------------------------------------------------------ model facts
def _per_model(results: pd.DataFrame, col: str) -> dict[str, Any]:
    """One value of a per-model column for each model that has one (validate_results made them agree)."""
    if col not in results.columns:
        return {}
    out = {}
    for m, g in results.groupby("model", sort=False):
        v = g[col].dropna()
        v = v[v.astype(str).str.strip() != ""]
        if len(v):
            out[str(m)] = v.iloc[0]
    return out


def _paper_names(results: pd.DataFrame) -> dict[str, str]:
    return {m: str(v) for m, v in _per_model(results, "paper_name").items()}


def _resolution_flags(results: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """model → (size its source top-1 was measured at, size it ran at), where both are known and differ."""
    run, fig = _per_model(results, "input_size"), _per_model(results, "source_input_size")
    return {m: (int(fig[m]), int(run[m])) for m in stats.model_order(results)
            if m in run and m in fig and int(run[m]) != int(fig[m])}


def _models_table(results: pd.DataFrame, head: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per model: the paper model it is named for, stand-in or not, source top-1 and the sizes behind it,
    and the entries it shares a result with (per regime)."""
    src = stats.source_top1_by_model(results)
    names, subs = _paper_names(results), set(stats.stand_ins(results))
    run, fig = _per_model(results, "input_size"), _per_model(results, "source_input_size")
    flags = _resolution_flags(results)
    rows = []
    for m in stats.model_order(results):
        shares = [f"{regime}: {', '.join(x for x in ms if x != m)}" for regime, h in head.items()
                  for ms in h["shared"].values() if m in ms]
        rows.append({"model": m, "paper model": names.get(m, ""), "stand-in": m in subs, "source top-1 (%)": src[m],
                     "figure at (px)": int(fig[m]) if m in fig else None, "runs at (px)": int(run[m]) if m in run else None,
                     "flag": "source top-1 at another size" if m in flags else "",
                     "shares its result with": "; ".join(shares)})
    return pd.DataFrame(rows)


def _solver_summary(results: pd.DataFrame) -> str:
    """How many fits did not pass their solver's convergence test (final results and grid), or ''."""
    parts = []
    if "solver_converged" in results.columns:
        conv = pd.to_numeric(results["solver_converged"], errors="coerce")
        known, bad = int(conv.notna().sum()), results[conv == 0]
        if known:
            cells = ", ".join(f"{r.model} / {r.dataset} / {r.regime}" for r in bad.itertuples(index=False))
            parts.append(f"{len(bad)} of {known} final fits did not converge (stalled or out of iterations)"
                         + (f": {cells}" if cells else ""))
    if "n_grid_unconverged" in results.columns:
        n = pd.to_numeric(results["n_grid_unconverged"], errors="coerce")
        if n.notna().any():
            parts.append(f"{int(n.fillna(0).sum())} grid fits did not converge")
    return ("; ".join(parts) + ". A fit converged only when its gradient test passed.") if parts else ""


# ------------------------------------------------------------------ the report
@dataclass
class Report:
    """What ``build_report`` wrote (``files``: name → path) and the per-regime headline numbers."""

    files: dict[str, Path]
    headline: dict[str, dict[str, Any]]

    def __getitem__(self, name: str) -> Path:
        return self.files[name]

    def summary_lines(self) -> list[str]:
        """One line per regime, for the sweep / CLI to print."""
        lines = []
        for regime, h in self.headline.items():
            line = f"{regime}: {_fmt_r(h)} over {h['n_datasets']} datasets"
            if "without_stand_ins" in h:
                line += f"; without stand-ins {_fmt_r(h['without_stand_ins'])}"
            lines.append(line)
        return lines


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def build_report(results: pd.DataFrame, out_dir: str | Path,
                 predictions: Mapping[tuple[str, str, str], "tuple[np.ndarray, np.ndarray] | None"] | None = None,
                 title: str = "Transfer study report", *, n_boot: int = 10_000, seed: int = 0,
                 alpha: float = stats.ALPHA, n_permutations: int = 1_000,
                 metric_fn: Callable[[str], stats.MetricFn] | None = None,
                 curves: Mapping[str, report_curves.Curve] | None = None, estimates: pd.DataFrame | None = None,
                 grid_seconds: Mapping[str, float] | None = None, asha: pd.DataFrame | None = None) -> Report:
    """Analyse a results table and write the report files into ``out_dir`` (see the module docstring).

    ``predictions`` maps (model, dataset, regime) to the final run's per-example test outputs
    ``(scores [N, C], targets [N] or [N, C])`` (or None when absent); without them the heat maps mark
    only the best model per dataset. ``curves`` maps grid run ids to validation curves (the convergence
    view). Rows along a cell axis (schedule, training-set size) feed ``xfer.report_curves``'s views; the
    rest of the report reads the rows at the cell axes' defaults. ``estimates``
    (``xfer.tracking.estimates.load_estimates``) adds the transferability-estimator section, with
    ``grid_seconds`` (per regime) as the cost to compare with. ``asha`` (``xfer.report_asha.comparison``)
    adds the early-stopping section. Returns a ``Report``.
    """
    full = validate_results(results)
    results = report_curves.main_cells(full).reset_index(drop=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    head = stats.headline(results, n_boot=n_boot, seed=seed)
    per_ds = stats.per_dataset_correlations(results, n_boot=min(n_boot, 2_000), seed=seed)
    intervals: dict[str, pd.DataFrame] = {}
    src = stats.source_top1_by_model(results)
    for regime, h in head.items():
        if len(h["points"]) >= 2 and len(h["datasets"]) >= 2:  # one row per point: a shared result once
            block = stats.value_matrix(results, regime).loc[h["models"], h["datasets"]]
            points, _, _ = stats.collapse_shared(block, src, [p["members"] for p in h["points"].values()])
            intervals[regime] = stats.within_subject_intervals(points)
    significance = None
    if predictions:
        significance = stats.not_worse_than_best(results, predictions, alpha=alpha, n_permutations=n_permutations,
                                                 seed=seed, metric_fn=metric_fn)
    comparison = stats.regime_comparison(results)
    regimes = stats.regimes_in(results)
    subs = stats.stand_ins(results)

    # figures
    figs: dict[str, tuple[Any, str]] = {
        "fig_correlation": (plot_correlation(results, head, intervals, title),
                            "Source top-1 vs mean log-odds transfer accuracy per regime; error bars: 95% within-"
                            "subject intervals (Morey 2008); line: least squares with 95% confidence band"
                            + (f"; open markers ({STAND_IN_MARK}): stand-ins" if subs else "")
                            + "; a = b: one result those entries share, at their mean source top-1."),
    }
    for regime in regimes:
        figs[f"fig_per_dataset_{_slug(regime)}"] = (
            plot_per_dataset(results, regime, per_ds),
            f"{regime_label(regime)}: source top-1 vs log-odds accuracy on each dataset.")
    if len(regimes) > 1:
        figs["fig_regime_comparison"] = (plot_regime_comparison(results),
                                         "Test accuracy per model under each regime, per dataset.")
    for regime in regimes:
        figs[f"fig_heatmap_{_slug(regime)}"] = (
            plot_heatmap(results, regime, significance, alpha),
            f"{regime_label(regime)}: test accuracy (%) per model and dataset.")
    for name, (fig, _) in figs.items():
        files[name] = _save(fig, out / f"{name}.png")

    # tables + documents
    doc = _Doc(title)
    n_m, n_d = results["model"].nunique(), results["dataset"].nunique()
    missing = results[~np.isfinite(pd.to_numeric(results["value"], errors="coerce"))]
    doc.p(f"{n_m} models × {n_d} datasets × {len(regimes)} regimes ({', '.join(regimes)}); "
          f"{len(results) - len(missing)} results, {len(missing)} missing.")
    doc.h("Headline: does source accuracy predict transfer accuracy?")
    rows = []
    for regime, h in head.items():
        variants = [("all", h)] + ([("without stand-ins", h["without_stand_ins"])] if "without_stand_ins" in h else [])
        for which, v in variants:
            lo, hi = v["ci"]
            excluded = ", ".join(f"{k} ({e})" for k, e in {**v["excluded_models"], **v["excluded_datasets"]}.items())
            rows.append({"regime": regime, "models": which, "Pearson r": v["r"],
                         f"{int(v['confidence'] * 100)}% CI": f"[{_fmt(lo, digits=2)}, {_fmt(hi, digits=2)}]",
                         "p": v["p"], "Spearman ρ": v["rho"], "ρ p": v["rho_p"], "points": v["n_models"],
                         "entries": v["n_entries"], "datasets": v["n_datasets"], "left out": excluded or "none"})
    doc.table(pd.DataFrame(rows))
    doc.p(f"r is between source top-1 and the mean log-odds test accuracy over datasets, across models; CI: "
          f"percentile bootstrap over models ({n_boot} resamples, seed {seed}). Means need every model on every "
          "dataset, so models or datasets with missing results are left out (listed). A result several model "
          "entries share (one run: the same run_id) is one point, at the mean of their source top-1s: 'points' "
          "counts what the correlation sees, 'entries' the model entries behind them.")
    if subs:
        names = _paper_names(results)
        doc.p(f"Stand-ins ({len(subs)}): " + "; ".join(f"{m} runs other weights under the name "
                                                        f"{names.get(m) or m}" for m in subs)
              + ". Their rows measure the stand-in network, not the paper's model, so every r is given with "
              "them ('all') and without them.")
    shared_lines = [f"{regime}: {', '.join(' = '.join(ms) for ms in h['shared'].values())}"
                    for regime, h in head.items() if h["shared"]]
    if shared_lines:
        doc.p("Shared results (counted once): " + "; ".join(shared_lines) + ".")
    doc.img(files["fig_correlation"], figs["fig_correlation"][1])

    doc.h("Models")
    doc.table(_models_table(results, head), pct=("source top-1 (%)",))
    flagged = _resolution_flags(results)
    if flagged:
        doc.p("Source accuracy at another resolution: " + "; ".join(
            f"{m}: source top-1 measured at {a} px, transfer run at {b} px" for m, (a, b) in flagged.items())
            + ". Their x-axis value is not the network's accuracy at the size the study used.")
    elif {"input_size", "source_input_size"} <= set(results.columns):
        doc.p("Every source top-1 with a recorded input size was measured at the size the model ran at.")

    doc.h("Per-model mean log-odds with within-subject intervals")
    per_model = pd.DataFrame({"model": stats.model_order(results)})
    per_model["source top-1 (%)"] = [src[m] for m in per_model["model"]]
    for regime in regimes:
        iv = intervals.get(regime)
        point_of = {m: label for label, p in head[regime]["points"].items() for m in p["members"]}
        per_model[f"{regime} mean log-odds"] = [iv.loc[point_of[m], "mean"] if iv is not None and m in point_of
                                                else math.nan for m in per_model["model"]]
        per_model[f"{regime} ± (95%)"] = [iv.loc[point_of[m], "half_width"] if iv is not None and m in point_of
                                          else math.nan for m in per_model["model"]]
    per_model["model"] = [_mark(m, m in subs) for m in per_model["model"]]
    doc.table(per_model, pct=("source top-1 (%)",))

    doc.h("Per-dataset correlations")
    doc.table(per_ds.assign(CI=[f"[{_fmt(a, digits=2)}, {_fmt(b, digits=2)}]"
                                for a, b in zip(per_ds["ci_low"], per_ds["ci_high"])])
              [["regime", "dataset", "r", "CI", "p", "rho", "rho_p", "n_models"]
               + (["r_without_stand_ins", "n_without_stand_ins"] if subs else [])])
    for regime in regimes:
        name = f"fig_per_dataset_{_slug(regime)}"
        doc.img(files[name], figs[name][1])

    if len(regimes) > 1:
        doc.h("Regime comparison")
        diff_cols = [c for c in comparison.columns if " - " in c]
        summary = comparison.groupby("dataset", sort=False)[diff_cols].mean().reset_index()
        doc.p("Mean over models of the log-odds difference between regimes, per dataset (positive: the first "
              "regime is better).")
        doc.table(summary)
        doc.img(files["fig_regime_comparison"], figs["fig_regime_comparison"][1])

    doc.h("Results per regime")
    if significance is None:
        doc.p("Significance not tested: no per-example test predictions were given (the report from a CSV "
              "has none); bold marks the best model per dataset.")
    else:
        tests = sorted({t for t in significance["test"].dropna()})
        doc.p(f"Outlined cells are not significantly worse than the dataset's best model (two-sided, α = {alpha}; "
              f"tests: {', '.join(tests) or 'none'}; exact McNemar for top-1, paired permutation test with "
              f"{n_permutations} permutations recomputing the metric otherwise).")
    for regime in regimes:
        name = f"fig_heatmap_{_slug(regime)}"
        doc.img(files[name], figs[name][1])
        wide = stats.value_matrix(results, regime, log_odds=False).reindex(stats.model_order(results))
        doc.p(f"{regime}: test accuracy (%)")
        table = wide.reset_index().rename(columns={"index": "model"})
        table.columns.name = None  # the pivot's "dataset" label would print as a stray header cell
        doc.table(table, pct=list(wide.columns))
    if significance is not None:
        doc.h("Significance tests")
        tested = significance.groupby(["regime", "dataset"], sort=False)["test"].transform(lambda t: t.notna().any())
        if tested.any():
            doc.table(significance[tested.astype(bool)], pct=("value",))
        else:
            doc.p("No pair could be tested (predictions were missing for the best models).")

    solver = _solver_summary(results)
    if solver:
        doc.h("Solver convergence")
        doc.p(solver)
    from xfer import report_factors  # the probe's feature axes: layer, pooling, PCA (Azizpour et al. 2014)

    for extra in (report_curves.views(full, out, curves, color=regime_color, label=regime_label),
                  report_factors.views(full, out)):
        for kind, x in extra.blocks:
            doc.img(*x) if kind == "img" else {"h2": doc.h, "p": doc.p, "table": doc.table}[kind](x)
        files.update(extra.files)

    if estimates is not None and len(estimates):
        from xfer import report_estimators  # the opt-in estimate stage's section

        section = report_estimators.build_section(estimates, results, grid_seconds)
        files.update(report_estimators.write_files(section, out))
        section.render(doc, files)

    if asha is not None:
        from xfer import report_asha  # search: {type: asha}: ASHA's picks against the full grid's

        files.update(report_asha.render(asha, doc, out))

    from xfer import report_regularizers as regs  # the paper's §4.1 view, when models differ in source training

    if regs.has_settings(results):
        view = regs.regularizer_table(results)
        files["fig_regularizers"] = _save(regs.plot_regularizers(view), out / "fig_regularizers.png")
        doc.h("Source-training regularisers")
        doc.p(regs.TEXT)
        doc.table(view, pct=regs.PCT_COLUMNS)
        doc.img(files["fig_regularizers"], regs.FIG_CAPTION)

    doc.h("Missing results")
    if missing.empty:
        doc.p("None: every model × dataset × regime cell has a result.")
    else:
        cols = [c for c in ["model", "dataset", "regime", "status", "note"] if c in missing.columns]
        doc.table(missing[cols])

    doc.h("Methods")
    doc.p(f"Log-odds: logit(p) = ln(p / (1 − p)) with p clipped to [ε, 1 − ε], ε = 1/(2n) when the test-set "
          f"size n is known (column n_test), else {stats.DEFAULT_EPS:g}. Within-subject intervals: Cousineau "
          "normalisation (subtract each dataset's mean over models, add the grand mean) with Morey's "
          "sqrt(M/(M−1)) correction, t-interval over datasets. Selection used validation only; test was "
          "evaluated once per cell at the selected hyper-parameters.")

    full.to_csv(out / "results.csv", index=False)
    files["results_csv"] = out / "results.csv"
    (out / "headline.json").write_text(json.dumps(_json_safe(head), indent=2))
    files["headline_json"] = out / "headline.json"
    (out / "report.md").write_text(doc.markdown())
    files["report_md"] = out / "report.md"
    (out / "report.html").write_text(doc.html())
    files["report_html"] = out / "report.html"
    log.info("report written to %s", out)
    return Report(files=files, headline=head)
