"""The report's "Early stopping (ASHA)" section: did ASHA pick what the full grid picks?

Under ``search: {type: asha, audit: true}`` every trial ASHA stopped was later run to the end, so each
audited cell has two picks on validation: ASHA's (best among the trials ASHA let finish — what an
un-audited ASHA sweep would have selected) and the full grid's (best among all). The final stage tests
both where they differ. Per cell: the two configurations, whether they are the same, their test
accuracies and |Δ|; over cells: how often ASHA picked the same configuration (k of n), mean and max
|Δ test| in points, and the compute saved (training steps ASHA ran against the full grid's). A cell is
*audited* when none of its trials is still ``stopped``; only audited cells enter the agreement figure.

Pure functions on tables (the runs table, ``{trial key: step ASHA stopped it at}`` and ``{trial key:
steps of the full trial}``); ``xfer.final`` reads them from MLflow. No Ray here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from xfer import select
from xfer.regimes import REGIMES
from xfer.trial import TrialSpec

TITLE = "Early stopping (ASHA)"
COLUMNS = ["model", "dataset", "regime", "asha_config", "grid_config", "same", "audited", "asha_val", "grid_val",
           "asha_test", "grid_test", "abs_delta_points", "n_trials", "n_stopped", "asha_steps", "grid_steps"]
FIG_CAPTION = ("Test accuracy of ASHA's pick against the full grid's pick, per audited cell (on the diagonal: "
               "the same accuracy; filled: the same configuration).")


def asha_selection(runs: pd.DataFrame, stops: Mapping[str, int], trials: Sequence[TrialSpec]) -> pd.DataFrame:
    """ASHA's pick per cell: best on validation among the grid trials ASHA did not stop."""
    stopped = (runs["stage"] == "grid") & runs["trial_key"].isin(set(stops))
    return select.select_best(runs[~stopped], trials=trials)


def _config(row: pd.Series) -> tuple[str, tuple]:
    """(``lr=0.01 wd=0``, the values on the regime's axes) of a selection row; ("—", ()) when missing."""
    if row["status"] != "selected":
        return "—", ()
    axes = REGIMES.get(row["regime"]).axes
    hp = {a.name: float(row[a.name]) for a in axes}
    # 12 significant digits: values that went through MLflow's string params still compare equal
    return REGIMES.get(row["regime"]).describe(hp) or "defaults", tuple(float(f"{v:.12g}") for v in hp.values())


def comparison(runs: pd.DataFrame, stops: Mapping[str, int], budgets: Mapping[str, int],
               trials: Sequence[TrialSpec]) -> pd.DataFrame:
    """One row per cell of the early-stopping trials (``budgets``' keys; ``trials``: the sweep's grid):
    ASHA's and the full grid's picks (``select.select_best``), their final-stage test values
    (``select.results_table``), |Δ| in points, and the steps each approach trained in the cell."""
    ours = [t for t in trials if t.key in budgets]
    grid_sel = select.select_best(runs, trials=ours)
    asha_sel = asha_selection(runs, stops, ours)
    finals = runs[runs["stage"] == "final"]
    grid_res = select.results_table(finals, grid_sel)
    asha_res = select.results_table(finals, asha_sel)
    status = dict(zip(runs.loc[runs["stage"] == "grid", "trial_key"], runs.loc[runs["stage"] == "grid", "status"]))
    by_cell: dict[tuple, list[str]] = {}
    for t in ours:
        by_cell.setdefault(select.cell_of(t), [])
        if t.key not in by_cell[select.cell_of(t)]:
            by_cell[select.cell_of(t)].append(t.key)
    rows = []
    for (_, g), (_, a), (_, gr), (_, ar) in zip(grid_sel.iterrows(), asha_sel.iterrows(), grid_res.iterrows(),
                                               asha_res.iterrows()):
        keys = by_cell.get((g["model"], g["dataset"], g["regime"], select.cell_point(g["regime"], g)), [])
        (g_desc, g_hp), (a_desc, a_hp) = _config(g), _config(a)
        stopped = [k for k in keys if k in stops]
        gt, at = float(gr["value"]), float(ar["value"])
        rows.append({"model": g["model"], "dataset": g["dataset"], "regime": g["regime"],
                     "asha_config": a_desc, "grid_config": g_desc, "same": bool(a_hp) and a_hp == g_hp,
                     "audited": all(status.get(k) in ("finished", "diverged") for k in stopped),
                     "asha_val": float(a["val"]), "grid_val": float(g["val"]), "asha_test": at, "grid_test": gt,
                     "abs_delta_points": abs(at - gt) * 100 if math.isfinite(at - gt) else math.nan,
                     "n_trials": len(keys), "n_stopped": len(stopped),
                     "asha_steps": int(sum(stops.get(k, budgets[k]) for k in keys)),
                     "grid_steps": int(sum(budgets[k] for k in keys))})
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """The agreement figure: over audited cells with both test values, how often ASHA's pick is the grid's
    (``same`` of ``cells``) and the mean / max |Δ test| in points; over all cells, the steps."""
    both = table[table["audited"] & np.isfinite(table["asha_test"]) & np.isfinite(table["grid_test"])]
    steps_asha, steps_grid = int(table["asha_steps"].sum()), int(table["grid_steps"].sum())
    return {"cells": int(len(both)), "same": int(both["same"].sum()),
            "mean_abs_delta_points": float(both["abs_delta_points"].mean()) if len(both) else math.nan,
            "max_abs_delta_points": float(both["abs_delta_points"].max()) if len(both) else math.nan,
            "stopped": int(table["n_stopped"].sum()), "trials": int(table["n_trials"].sum()),
            "asha_steps": steps_asha, "grid_steps": steps_grid,
            "steps_saved": (1 - steps_asha / steps_grid) if steps_grid else math.nan,
            "unaudited_cells": int((~table["audited"]).sum())}


def headline(s: Mapping[str, Any]) -> str:
    """One line: the ASHA agreement figure."""
    if not s["cells"]:
        agree = "no audited cell with both test values"
    else:
        agree = (f"same pick in {s['same']} of {s['cells']} audited cells; |Δ test| mean "
                 f"{s['mean_abs_delta_points']:.2f}, max {s['max_abs_delta_points']:.2f} points")
    return (f"{agree}; {s['stopped']} of {s['trials']} trials stopped, {s['asha_steps']} of {s['grid_steps']} "
            f"training steps ({100 * s['steps_saved']:.0f}% saved)")


def plot(table: pd.DataFrame) -> Any:
    """ASHA-pick test accuracy against grid-pick test accuracy per audited cell, with the diagonal."""
    from matplotlib.figure import Figure

    t = table[table["audited"] & np.isfinite(table["asha_test"]) & np.isfinite(table["grid_test"])]
    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.subplots()
    x, y = 100 * t["grid_test"].to_numpy(float), 100 * t["asha_test"].to_numpy(float)
    same = t["same"].to_numpy(bool)
    ax.scatter(x[same], y[same], color="#1f77b4", label="same configuration", zorder=3)
    ax.scatter(x[~same], y[~same], facecolors="none", edgecolors="#d62728", label="different configuration", zorder=3)
    one_regime = t["regime"].nunique() <= 1
    for xi, yi, (_, r) in zip(x, y, t.iterrows()):
        name = f"{r['model']}/{r['dataset']}" + ("" if one_regime else f"/{r['regime']}")
        ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, -8), textcoords="offset points")
    lo, hi = (min(x.min(), y.min()), max(x.max(), y.max())) if len(t) else (0.0, 100.0)
    pad = max(1.0, 0.05 * (hi - lo))
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#888", lw=0.8, ls="--", zorder=1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")  # the diagonal at 45°: distance from it is the accuracy lost
    ax.set_xlabel("full grid's pick: test accuracy (%)")
    ax.set_ylabel("ASHA's pick: test accuracy (%)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    return fig


def render(table: pd.DataFrame, doc: Any, out: Path) -> dict[str, Path]:
    """Append the section to a report document (``h``, ``p``, ``table``, ``img``); write ``asha.csv``,
    ``asha.json`` (the summary) and ``fig_asha.png`` into ``out``. Returns the files."""
    s = summary(table)
    files = {"asha_csv": out / "asha.csv", "asha_json": out / "asha.json", "fig_asha": out / "fig_asha.png"}
    table.to_csv(files["asha_csv"], index=False)
    files["asha_json"].write_text(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                              for k, v in s.items()}, indent=2))
    plot(table).savefig(files["fig_asha"], dpi=130)
    doc.h(TITLE)
    doc.p("ASHA (asynchronous successive halving) stopped grid trials whose validation fell below the top "
          "1/reduction_factor of their cell at a rung. ASHA's pick: best on validation among the trials it let "
          "finish; the grid's: best among all of them once the audit ran the stopped ones to the end. Both picks "
          "were retrained on train+val and tested once (accuracies in %). Agreement: " + headline(s) + "."
          + (f" {s['unaudited_cells']} cell(s) still have stopped trials (not audited): they count for the steps "
             "only." if s["unaudited_cells"] else ""))
    doc.table(table.rename(columns={"abs_delta_points": "|Δ test| points"}),
              pct=("asha_val", "grid_val", "asha_test", "grid_test"))  # accuracies in %, as elsewhere
    doc.img(files["fig_asha"], FIG_CAPTION)
    return files
