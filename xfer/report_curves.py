"""The report's views along a regime's *cell axes* (schedule length, training-set size) and over training.

A results table may hold several rows per (model, dataset, regime): one per value of a cell axis
(``Axis(cell=True)``, e.g. ``schedule`` and ``train_size`` of fine-tuning and training from scratch).
The main analysis (source accuracy vs transfer, significance, heat maps) reads the rows at every cell
axis's default (``main_cells``); this module turns the table — and, from MLflow, the selected grid
runs' per-step validation curves — into three views:

* **Convergence** (Kornblith et al. 2019, Figure 5): the steps a run needs to reach 90 % of its final
  validation log-odds (``steps_to_fraction``), pre-trained vs from random initialisation.
* **Schedule length** (He et al. 2018): the fine-tune minus scratch test log-odds gap against the
  schedule multiplier — does random initialisation catch up given a longer schedule?
* **Training-set size** (Kornblith et al. 2019, Figure 6): test accuracy against images per class,
  per regime, with error bars over the seeds (each seed draws its own class-balanced subset).

A view appears only when the table has what it needs (curves with several points; two or more values of
the axis). Everything here but the plotting is pure: DataFrames in, DataFrames out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from xfer import stats
from xfer.regimes import REGIMES

FRACTION = 0.9  # "steps to reach 90 % of the final log-odds"
SCHEDULE, TRAIN_SIZE = "schedule", "train_size"
Curve = Sequence[tuple[int, float]]  # (step, validation metric as a fraction), in step order
Block = tuple[str, Any]  # ("h2", text) | ("p", text) | ("table", DataFrame) | ("img", (path, caption))
DPI = 130


# ------------------------------------------------------------------ pure pieces
def steps_to_fraction(steps: Sequence[float], log_odds: Sequence[float], fraction: float = FRACTION,
                      baseline: float = 0.0) -> float:
    """The first step at which a curve reaches ``baseline + fraction · (final − baseline)``, where
    ``final`` is its last value (log-odds). With ``baseline`` 0 that is "90 % of the final log-odds".

    The answer is an evaluated step (its resolution is the evaluation cadence). NaN when the curve is
    empty or its final value is not above ``baseline`` (a final accuracy at or below 50 % has no
    meaningful 90 % of its log-odds); non-finite points are skipped.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    s = np.asarray(steps, dtype=float)
    v = np.asarray(log_odds, dtype=float)
    if s.shape != v.shape:
        raise ValueError(f"steps and values differ in length ({s.size} vs {v.size})")
    ok = np.isfinite(s) & np.isfinite(v)
    s, v = s[ok], v[ok]
    if not s.size:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    s, v = s[order], v[order]
    final = v[-1]
    if not final > baseline:
        return math.nan
    threshold = baseline + fraction * (final - baseline)
    return float(s[np.argmax(v >= threshold - 1e-12)])  # the last point reaches it, so argmax finds one


def cell_axis_columns(results: pd.DataFrame) -> list[str]:
    """The cell axes of registered regimes that are columns of ``results``, sorted."""
    names = {a.name for r in REGIMES.names() for a in REGIMES.get(r).cell_axes}
    return sorted(c for c in results.columns if c in names)


def _at_default(results: pd.DataFrame, column: str) -> np.ndarray:
    """Rows whose ``column`` is missing (NaN: the regime has no such axis, or the run predates it) or
    equals the default the row's regime declares for it."""
    vals = pd.to_numeric(results[column], errors="coerce").to_numpy(float)
    default = np.array([REGIMES.get(r).axis(column).default if r in REGIMES and column in REGIMES.get(r).axis_names
                        else np.nan for r in results["regime"]], dtype=float)
    return np.isnan(vals) | np.isclose(vals, default, rtol=1e-9, atol=0.0)


def main_cells(results: pd.DataFrame) -> pd.DataFrame:
    """The rows the main analysis reads: every cell axis at its default (one row per model, dataset
    and regime, as the main analysis expects)."""
    keep = np.ones(len(results), dtype=bool)
    for c in cell_axis_columns(results):
        keep &= _at_default(results, c)
    return results[keep]


def _log_odds(df: pd.DataFrame) -> np.ndarray:
    return np.asarray(stats.logit(pd.to_numeric(df["value"], errors="coerce").to_numpy(float)), dtype=float)


def _others_at_default(results: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows along one cell axis: the regime declares it, every *other* cell axis at its default."""
    declares = np.array([r in REGIMES and column in REGIMES.get(r).axis_names for r in results["regime"]])
    keep = declares.copy()
    for c in cell_axis_columns(results):
        if c != column:
            keep &= _at_default(results, c)
    out = results[keep].copy()
    out[column] = [float(v) if np.isfinite(v) else REGIMES.get(r).axis(column).default
                   for v, r in zip(pd.to_numeric(out[column], errors="coerce"), out["regime"])]
    return out


def convergence_table(results: pd.DataFrame, curves: Mapping[str, Curve], fraction: float = FRACTION
                      ) -> pd.DataFrame:
    """One row per results row whose selected grid run (``grid_run_id``) has a validation curve of at
    least two points: its steps, final validation accuracy and steps to ``fraction`` of its final
    log-odds (absolute and as a fraction of its schedule)."""
    cols = ["model", "dataset", "regime", *cell_axis_columns(results), "steps", "final_val", "steps_to_90",
            "fraction_of_schedule"]
    rows = []
    if "grid_run_id" not in results.columns:
        return pd.DataFrame(rows, columns=cols)
    for row in results.to_dict("records"):
        curve = curves.get(str(row.get("grid_run_id")))
        if not curve or len(curve) < 2:
            continue
        steps = np.array([p[0] for p in curve], dtype=float)
        vals = np.array([p[1] for p in curve], dtype=float)
        reach = steps_to_fraction(steps, stats.logit(vals), fraction)
        rows.append({**{c: row[c] for c in cols[:-4]}, "steps": int(steps.max()), "final_val": float(vals[-1]),
                     "steps_to_90": reach, "fraction_of_schedule": reach / steps.max()})
    return pd.DataFrame(rows, columns=cols)


def schedule_gap(results: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset, schedule): test log-odds of each regime that declares ``schedule`` and the
    gap between the first two in registry order (e.g. fine-tuned − from scratch). Empty unless some
    regime has two or more schedule values."""
    cols = ["model", "dataset", SCHEDULE, "regime_a", "regime_b", "log_odds_a", "log_odds_b", "gap"]
    if SCHEDULE not in results.columns:
        return pd.DataFrame(columns=cols)
    df = _others_at_default(results, SCHEDULE)
    df = df.assign(lo=_log_odds(df))
    regimes = [r for r in REGIMES.names() if r in set(df["regime"])]
    if len(regimes) < 2 or df[SCHEDULE].nunique() < 2:
        return pd.DataFrame(columns=cols)
    a, b = regimes[:2]
    wide = df.pivot_table(index=["model", "dataset", SCHEDULE], columns="regime", values="lo", aggfunc="mean")
    wide = wide.dropna(subset=[a, b]).reset_index()
    out = pd.DataFrame({"model": wide["model"], "dataset": wide["dataset"], SCHEDULE: wide[SCHEDULE],
                        "regime_a": a, "regime_b": b, "log_odds_a": wide[a], "log_odds_b": wide[b],
                        "gap": wide[a] - wide[b]})
    return out.sort_values(["dataset", "model", SCHEDULE], kind="mergesort").reset_index(drop=True)[cols]


def datasize_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, regime, model, train_size): test accuracy (mean over seeds), its standard deviation
    over seeds and the number of seeds. Empty unless some regime has two or more sizes."""
    cols = ["dataset", "regime", "model", TRAIN_SIZE, "value", "value_sd", "n_seeds"]
    if TRAIN_SIZE not in results.columns:
        return pd.DataFrame(columns=cols)
    df = _others_at_default(results, TRAIN_SIZE)
    if df[TRAIN_SIZE].nunique() < 2:
        return pd.DataFrame(columns=cols)
    for c in ("value_sd", "n_seeds"):
        if c not in df.columns:
            df[c] = np.nan
    df = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))
    order = df.assign(_size=df[TRAIN_SIZE].replace(0.0, math.inf))  # "all" after every subset
    return order.sort_values(["dataset", "regime", "model", "_size"], kind="mergesort")[cols].reset_index(drop=True)


def size_label(v: float) -> str:
    return "all" if v == 0 else f"{v:g}"


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """A table as the report prints it: schedule as ``2×``, sizes as counts or ``all``, steps as integers."""
    out = df.copy()
    if SCHEDULE in out.columns:
        out[SCHEDULE] = [f"{v:g}×" for v in out[SCHEDULE]]
    if TRAIN_SIZE in out.columns:
        out[TRAIN_SIZE] = [size_label(v) for v in out[TRAIN_SIZE]]
    for c in out.columns:
        if c in ("steps", "steps_to_90", "n_seeds") or str(c).startswith(tuple(f"{r}: median" for r in REGIMES.names())):
            out[c] = [str(int(round(v))) if np.isfinite(v) else None for v in pd.to_numeric(out[c], errors="coerce")]
    return out


# ------------------------------------------------------------------ figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state

    return Figure(figsize=(width, height), layout="constrained")


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    cols = min(n, 3)
    fig = _figure(width * cols, height * math.ceil(n / cols))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_convergence(results: pd.DataFrame, curves: Mapping[str, Curve], conv: pd.DataFrame,
                     color: Callable[[str], str], label: Callable[[str], str]) -> Any:
    """A panel per dataset and schedule length (training-set size at its default): validation log-odds
    against step for each regime and model, the step where a run reaches 90 % of its final log-odds
    marked with a circle."""
    rows = _others_at_default(results, SCHEDULE) if SCHEDULE in results.columns else main_cells(results)
    rows = rows[[str(r) in curves and len(curves[str(r)]) >= 2 for r in rows.get("grid_run_id", [None] * len(rows))]]
    if SCHEDULE not in rows.columns:
        rows = rows.assign(**{SCHEDULE: 1.0})
    panels = list(dict.fromkeys(zip(rows["dataset"], rows[SCHEDULE])))
    panels.sort(key=lambda p: (stats.datasets_in(rows).index(p[0]), p[1]))
    fig, axes = _panels(len(panels))
    reach = {(r.model, r.dataset, r.regime, float(getattr(r, SCHEDULE, 1.0) or 1.0)): r.steps_to_90
             for r in conv.itertuples(index=False)}
    for ax, (ds, sched) in zip(axes, panels):
        seen: set[str] = set()
        for row in rows[(rows["dataset"] == ds) & (rows[SCHEDULE] == sched)].itertuples(index=False):
            curve = curves[str(row.grid_run_id)]
            steps = np.array([p[0] for p in curve], dtype=float)
            lo = np.asarray(stats.logit(np.array([p[1] for p in curve], dtype=float)), dtype=float)
            c = color(row.regime)
            ax.plot(steps, lo, "-", color=c, lw=1.2, alpha=0.8, label=None if row.regime in seen else label(row.regime))
            seen.add(row.regime)
            at = reach.get((row.model, row.dataset, row.regime, float(sched)), math.nan)
            if np.isfinite(at):
                ax.plot([at], [lo[np.searchsorted(steps, at)]], "o", color=c, ms=6, mfc="white", zorder=3)
        ax.set_title(f"{ds} · schedule {sched:g}×" if rows[SCHEDULE].nunique() > 1 else ds, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation log-odds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5)
    return fig


def plot_schedule_gap(gap: pd.DataFrame, label: Callable[[str], str]) -> Any:
    fig = _figure(5.2, 3.8)
    ax = fig.subplots()
    for i, (ds, g) in enumerate(gap.groupby("dataset", sort=False)):
        m = g.groupby(SCHEDULE)["gap"].agg(["mean", "min", "max"]).reset_index()
        ax.errorbar(m[SCHEDULE], m["mean"], yerr=[m["mean"] - m["min"], m["max"] - m["mean"]], fmt="o-", capsize=3,
                    lw=1.2, ms=5, label=ds, color=f"C{i}")
    ax.axhline(0, color="#555", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    xs = sorted(gap[SCHEDULE].unique())
    ax.set_xticks(xs, [f"{x:g}×" for x in xs])
    ax.set_xlabel("schedule length (multiple of the base steps)")
    a, b = gap["regime_a"].iloc[0], gap["regime_b"].iloc[0]
    ax.set_ylabel(f"test log-odds: {a} − {b}")
    ax.set_title(f"{label(a)} vs {label(b)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5)
    return fig


def plot_datasize(size: pd.DataFrame, color: Callable[[str], str], label: Callable[[str], str]) -> Any:
    """Per dataset: test accuracy (%) against images per class ("all": the whole training split), a
    line per regime and model, error bars ± one standard deviation over seeds."""
    datasets = list(dict.fromkeys(size["dataset"]))
    fig, axes = _panels(len(datasets))
    markers = "osD^vP*X"
    models = list(dict.fromkeys(size["model"]))
    for ax, ds in zip(axes, datasets):
        g = size[size["dataset"] == ds]
        sizes = sorted(set(g[TRAIN_SIZE]), key=lambda v: (v == 0, v))  # "all" last
        pos = {v: i for i, v in enumerate(sizes)}
        for (regime, model), line in g.groupby(["regime", "model"], sort=False):
            line = line.sort_values(TRAIN_SIZE, key=lambda s: s.map(pos))
            sd = pd.to_numeric(line["value_sd"], errors="coerce").fillna(0).to_numpy() * 100
            ax.errorbar([pos[v] for v in line[TRAIN_SIZE]], line["value"] * 100, yerr=sd, capsize=3, lw=1.2, ms=5,
                        color=color(regime), marker=markers[models.index(model) % len(markers)],
                        label=f"{label(regime)} · {model}" if len(models) > 1 else label(regime))
        ax.set_xticks(range(len(sizes)), [size_label(v) for v in sizes])
        ax.set_xlabel("training images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(ds, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------ the report's sections
@dataclass
class CurveViews:
    """What ``views`` adds to a report: document blocks in order and the figure files."""

    blocks: list[Block] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def views(results: pd.DataFrame, out_dir: str | Path, curves: Mapping[str, Curve] | None = None, *,
          color: Callable[[str], str], label: Callable[[str], str], fraction: float = FRACTION) -> CurveViews:
    """The convergence, schedule-length and training-set-size sections of a report (see the module
    docstring); ``curves`` maps a grid run id to its validation curve (``xfer.tracking.load_curves``)."""
    out = Path(out_dir)
    made = CurveViews()

    def figure(name: str, fig: Any, caption: str) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        made.files[name] = path
        made.blocks.append(("img", (path, caption)))

    conv = convergence_table(results, curves or {}, fraction)
    if not conv.empty:
        pct = int(round(fraction * 100))
        made.blocks.append(("h2", "Convergence"))
        made.blocks.append(("p", f"Steps each selected grid run needed to reach {pct} % of its final validation "
                                 "log-odds (first evaluated step at or above it; resolution: the eval_every cadence). "
                                 "'—': the final validation accuracy is at or below 50 %, where a fraction of the "
                                 "log-odds means nothing."))
        keys = ["dataset", *[c for c in cell_axis_columns(conv) if conv[c].nunique() > 1]]
        summary = conv.pivot_table(index=keys, columns="regime", values="steps_to_90", aggfunc="median", dropna=False)
        summary.columns = [f"{r}: median steps to {pct} %" for r in summary.columns]
        made.blocks.append(("table", _shown(summary.reset_index())))
        made.blocks.append(("table", _shown(conv.drop(columns=[c for c in cell_axis_columns(conv) if c not in keys]))))
        figure("fig_convergence", plot_convergence(results, curves or {}, conv, color, label),
               f"Validation log-odds during training at the selected configuration; circles: {pct} % of the "
               "final log-odds reached (pre-trained networks converge faster: the paper's Figure 5).")

    gap = schedule_gap(results)
    if not gap.empty:
        a, b = gap["regime_a"].iloc[0], gap["regime_b"].iloc[0]
        made.blocks.append(("h2", "Schedule length"))
        made.blocks.append(("p", f"Test log-odds of {a} minus {b} at each schedule length (a multiple of each "
                                 "regime's steps; cosine decay over the whole schedule). A gap that shrinks with "
                                 "the schedule is random initialisation catching up (He et al. 2018)."))
        means = gap.groupby(["dataset", SCHEDULE], sort=False)[["log_odds_a", "log_odds_b", "gap"]].mean()
        made.blocks.append(("table", _shown(means.reset_index()).rename(columns={
            "log_odds_a": f"{a} log-odds", "log_odds_b": f"{b} log-odds", "gap": "gap (mean over models)"})))
        figure("fig_schedule_gap", plot_schedule_gap(gap, label),
               f"{label(a)} minus {label(b)} test log-odds against schedule length; points: mean over models, "
               "bars: their range.")

    size = datasize_table(results)
    if not size.empty:
        made.blocks.append(("h2", "Training-set size"))
        made.blocks.append(("p", "Test accuracy on class-balanced subsets of the training split (images per class; "
                                 "'all': the whole split). Each seed draws its own subset (nested across sizes); "
                                 "values are means over seeds, ± one standard deviation over seeds (the paper's "
                                 "Figure 6)."))
        shown = _shown(size).rename(columns={"value": "test accuracy (%)", "value_sd": "± s.d. (%)"})
        shown[["test accuracy (%)", "± s.d. (%)"]] = shown[["test accuracy (%)", "± s.d. (%)"]] * 100
        made.blocks.append(("table", shown))
        figure("fig_datasize", plot_datasize(size, color, label),
               "Test accuracy against training images per class, per regime; error bars: ± one standard "
               "deviation over seeds.")
    return made
