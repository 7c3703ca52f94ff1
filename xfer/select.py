"""Best-on-validation selection and the final-stage trial list (pure: DataFrames and TrialSpecs in/out).

Selection never sees test: it ranks grid runs by their ``val`` metric only. Each (model, dataset,
regime) *cell* gets one configuration; the final stage retrains that configuration on train+val and
evaluates test once (``final_trials``); ``results_table`` turns the final runs into the table that
``xfer report`` analyses.

Rules (all deterministic, so rerunning selection on the same runs picks the same trials):

* Only ``status == "finished"`` runs with a finite ``val`` can be chosen; diverged and failed runs
  are counted (``n_trials``) but never selected.
* A *configuration* is the trial's grid point: its value on every axis its regime declares
  (``xfer.regimes``; the runs table has a column per axis). With several seeds its score is the mean
  ``val`` over its finished seeds. Runs of one cell that agree on every axis and seed but are
  different trials (they differ in something the table cannot show, e.g. options changed between
  invocations) are refused with ``SelectionError`` rather than averaged.
* Tie-break, in order: higher val; then each axis in the regime's order, the value its ``prefer``
  names winning (e.g. smaller lr, smaller wd; larger l2: the simpler model); then the trial key
  (lexicographic) so that the result never depends on row order. Vals are compared after rounding to
  12 decimals (exact ties are common: accuracies are k/n).
* A regime's *cell axes* (``Axis(cell=True)``: schedule length, training-set size) are never selected
  over: each of their values is a cell of its own, with its own best configuration, final trial and
  results row (a run that predates such an axis reads as its default).
* A cell with no selectable run is kept with ``status="missing"`` — never dropped — so a report can
  show what is absent. Pass ``trials=`` (the sweep's grid) to also report cells that have no runs at
  all and to ignore runs of trials no longer in the sweep file.
* With ``trials=``, every row also says what its model entry is (``MODEL_FACTS``: the paper model it
  is named for, whether it is a stand-in, the input size it runs at and the one its source top-1 was
  measured at); the results table carries them to the report. ``n_unconverged`` counts the cell's grid
  fits whose iterative solver did not pass its convergence test (``solver_converged`` = 0).
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from xfer.regimes import REGIMES, Axis, all_axis_names
from xfer.source_accuracy import model_facts
from xfer.trial import TrialSpec

log = logging.getLogger(__name__)

Cell = tuple[str, str, str]  # (model, dataset, regime)
CellPoint = tuple[tuple[str, float], ...]  # the values of a regime's cell axes, in its order
CELL_COLUMNS = ["model", "dataset", "regime"]
RUNS_REQUIRED = ["run_id", "trial_key", "model", "dataset", "regime", "stage", "status", "val"]
VAL_DECIMALS = 12
MODEL_FACTS = ["paper_name", "stand_in", "input_size", "source_input_size"]  # xfer.source_accuracy.model_facts


class SelectionError(ValueError):
    """Runs that selection cannot tell apart or a regime whose axes it does not know."""


def cell_point(regime: str, values: Any) -> CellPoint:
    """``((axis, value), ...)`` for the regime's cell axes (a missing or NaN value is the default)."""
    if regime not in REGIMES:
        return ()
    out = []
    for a in REGIMES.get(regime).cell_axes:
        v = _norm(values.get(a.name)) if hasattr(values, "get") else None
        out.append((a.name, float(a.default) if v is None else v))
    return tuple(out)


def cell_of(trial: TrialSpec) -> tuple[str, str, str, CellPoint]:
    """The cell selection keeps one configuration for: (model, dataset, regime, cell point)."""
    return (*trial.cell, cell_point(trial.regime, trial.hparams))


def _cell_label(cell: tuple) -> str:
    known = cell[2] in REGIMES  # a named axis (pooling) prints its name
    point = " ".join(REGIMES.get(cell[2]).axis(k).format(v) if known else f"{k}={v:g}"
                     for k, v in (cell[3] if len(cell) > 3 else ()) if v != _default(cell[2], k))
    return " / ".join(cell[:3]) + (f" [{point}]" if point else "")


def _default(regime: str, axis: str) -> float | None:
    return REGIMES.get(regime).axis(axis).default if regime in REGIMES else None


def selection_columns() -> list[str]:
    return ["model", "dataset", "regime", "status", "run_id", "trial_key", "val", *all_axis_names(),
            "n_trials", "n_finished", "n_unconverged", "metric", "source_top1", *MODEL_FACTS]


def results_columns() -> list[str]:
    return ["model", "dataset", "regime", "source_top1", "metric", "value", "value_sd", *all_axis_names(), "run_id",
            "grid_run_id", "val", "status", "n_seeds", "note", *MODEL_FACTS, "solver_converged", "n_grid_unconverged"]


def regime_axes(regime: str) -> tuple[Axis, ...]:
    if regime not in REGIMES:
        raise SelectionError(f"runs of regime {regime!r}: no such regime is registered, so selection cannot know "
                             f"its grid axes; registered: {', '.join(REGIMES.names())}")
    return REGIMES.get(regime).axes


def _check_columns(df: pd.DataFrame, required: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}; required: {', '.join(required)}; "
                         f"found: {', '.join(map(str, df.columns)) or '(none)'}")


def _with_optional(df: pd.DataFrame) -> pd.DataFrame:
    """Add the optional runs-table columns as NaN so the code below can rely on them."""
    df = df.copy()
    for c in all_axis_names() + ["test", "source_top1", "solver_converged", "seed", "start_time"]:
        if c not in df.columns:
            df[c] = np.nan
    if "metric" not in df.columns:
        df["metric"] = None
    for regime in df["regime"].dropna().unique():  # a run from before a cell axis existed ran its default
        rows = (df["regime"] == regime).to_numpy()
        for a in REGIMES.get(regime).cell_axes if regime in REGIMES else ():
            col = pd.to_numeric(df[a.name], errors="coerce")
            df[a.name] = col.where(~(rows & col.isna().to_numpy()), float(a.default))
    return df


def expected_cells(trials: Iterable[TrialSpec]) -> list[Cell]:
    """The (model, dataset, regime) cells a list of grid trials covers, in first-appearance order."""
    seen: dict[Cell, None] = {}
    for t in trials:
        seen.setdefault(t.cell, None)
    return list(seen)


def _norm(v: Any) -> float | None:
    """A runs-table float as an identity (NaN → None; 12 significant digits so that a value that went
    through MLflow's string params still matches)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else float(f"{f:.12g}")


def _hp_key(values: dict[str, Any], axes: Sequence[Axis]) -> tuple:
    """The configuration: the value on each of the regime's axes, in the regime's order (an axis with a
    default that the trial or run does not name ran at its default)."""
    return tuple(a.default if v is None and a.default is not None else v
                 for a, v in ((a, _norm(values.get(a.name))) for a in axes))


def _time_key(start: pd.Series) -> pd.Series:
    """start_time (timestamps from MLflow, or plain numbers) as floats for ordering; unknown → -inf."""
    if not pd.api.types.is_numeric_dtype(start):
        ts = pd.to_datetime(start, utc=True, errors="coerce")
        return pd.Series([t.value if not pd.isna(t) else -np.inf for t in ts], index=start.index, dtype=float)
    return pd.to_numeric(start, errors="coerce").astype(float).fillna(-np.inf)


def _dedupe_by_cell_key(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, trial_key) (a re-run that was logged twice): keep the latest start_time.
    A trial several models share keeps one row per model."""
    if runs.empty:
        return runs
    order = runs.assign(_t=_time_key(runs["start_time"]))
    order = order.sort_values(["trial_key", "_t"], kind="mergesort")
    return order.drop_duplicates(CELL_COLUMNS + ["trial_key"], keep="last").drop(columns="_t")


def _check_distinguishable(cell: tuple, g: pd.DataFrame) -> None:
    """Refuse runs of one cell that agree on every axis and seed but are different trials."""
    seeds = pd.to_numeric(g["seed"], errors="coerce").fillna(0)
    for (hp, seed), keys in g.assign(_seed=seeds).groupby(["hp", "_seed"], sort=False)["trial_key"]:
        if keys.nunique() > 1:
            raise SelectionError(
                f"{_cell_label(cell)}: runs {', '.join(sorted(keys.unique()))} have the same grid point {hp} and "
                f"seed {int(seed)} but are different trials (options or model fields changed between sweeps, or an "
                "axis the runs table does not show); select with the sweep file (`xfer report --spec`) or remove the "
                "stale runs")


def _rank_key(row: dict[str, Any], axes: Sequence[Axis]) -> tuple:
    """Sort key: smaller is better (see the module docstring for the order)."""
    prefs = tuple(a.rank(math.nan if v is None else v) for a, v in zip(axes, row["hp"]))
    return (-round(float(row["val_mean"]), VAL_DECIMALS), *prefs, str(row["trial_key"]))


def _first_finite(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return float(v.iloc[0]) if len(v) else math.nan


def select_best(runs: pd.DataFrame, stage: str = "grid", *, trials: Sequence[TrialSpec] | None = None
                ) -> pd.DataFrame:
    """Pick the best configuration on ``val`` for every (model, dataset, regime) cell.

    ``runs`` is the runs table (``xfer.tracking.load_runs``). ``trials`` (optional, the sweep's grid
    TrialSpecs) fixes the set and order of cells — cells without any run come out as ``missing`` —
    and restricts selection to runs whose trial_key is in that grid. Returns one row per cell with
    ``selection_columns()``; ``run_id``/``trial_key`` name the chosen configuration's run with the
    smallest seed.
    """
    _check_columns(runs, RUNS_REQUIRED, "runs table")
    df = _with_optional(runs)
    df = df[df["stage"] == stage]
    hp_by_key: dict[str, dict[str, float]] = {}
    if trials is not None:
        keys = {t.key: t for t in trials}
        outside = ~df["trial_key"].isin(keys)
        if outside.any():
            log.info("selection ignores %d %s run(s) whose trial key is not in the sweep's grid",
                     int(outside.sum()), stage)
        df = df[~outside]
        hp_by_key = {k: dict(t.hparams) for k, t in keys.items()}
        cells = list(dict.fromkeys(cell_of(t) for t in trials))
        facts = {t.model.name: model_facts(t.model) for t in {t.model.name: t for t in trials}.values()}
    else:
        facts = {}
    df = _dedupe_by_cell_key(df)
    records = df.to_dict("records")
    df = df.assign(hp=[_hp_key(hp_by_key.get(row["trial_key"]) or row, regime_axes(row["regime"])) for row in records],
                   _point=[cell_point(row["regime"], hp_by_key.get(row["trial_key"]) or row) for row in records])
    if trials is None:
        cells = sorted({(str(m), str(d), str(r), p) for m, d, r, p in df[CELL_COLUMNS + ["_point"]].itertuples(
            index=False)})

    groups = {cell: g for cell, g in df.groupby(CELL_COLUMNS + ["_point"], sort=False)}
    rows = []
    for cell in cells:
        g = groups.get(cell, df.iloc[0:0])
        _check_distinguishable(cell, g)
        ok = g[(g["status"] == "finished") & np.isfinite(pd.to_numeric(g["val"], errors="coerce"))]
        row: dict[str, Any] = dict(zip(CELL_COLUMNS, cell[:3]), status="missing", run_id=None, trial_key=None,
                                   val=math.nan, **{**{a: math.nan for a in all_axis_names()}, **dict(cell[3])},
                                   n_trials=len(g),
                                   n_finished=int((g["status"] == "finished").sum()),
                                   n_unconverged=int((pd.to_numeric(g["solver_converged"], errors="coerce") == 0).sum()),
                                   metric=next((m for m in g["metric"] if isinstance(m, str) and m), None),
                                   source_top1=_first_finite(g["source_top1"]),
                                   **facts.get(cell[0], dict.fromkeys(MODEL_FACTS)))
        if not ok.empty:
            ok = ok.assign(val=pd.to_numeric(ok["val"]), _seed=pd.to_numeric(ok["seed"], errors="coerce").fillna(0))
            # one candidate per configuration: mean val over its finished seeds, named by its smallest seed
            cands = []
            for hp, cg in ok.groupby("hp", sort=False):
                rep = cg.sort_values(["_seed", "trial_key"], kind="mergesort").iloc[0]
                cands.append({"hp": hp, "val_mean": float(cg["val"].mean()), "trial_key": rep["trial_key"],
                              "run_id": rep["run_id"], "rep": rep})
            axes = regime_axes(cell[2])
            best = min(cands, key=lambda c: _rank_key(c, axes))
            rep = best["rep"]
            row.update(status="selected", run_id=rep["run_id"], trial_key=rep["trial_key"], val=best["val_mean"],
                       **{a.name: v for a, v in zip(axes, best["hp"])})
        else:
            statuses = ", ".join(f"{s} {n}" for s, n in g["status"].value_counts().sort_index().items()) or "no runs"
            log.warning("no finished %s run for %s (%s): the cell is missing", stage, _cell_label(cell), statuses)
        rows.append(row)
    return pd.DataFrame(rows, columns=selection_columns())


def final_trials(selection: pd.DataFrame, grid_trials: Sequence[TrialSpec]) -> list[TrialSpec]:
    """The final-stage trials: each selected grid configuration (every seed of it that the grid has)
    with ``stage="final"``, in the grid's order, one per cell (cells that share a trial key share
    the final run too). Missing cells get no final trial."""
    _check_columns(selection, ["model", "dataset", "regime", "status", "trial_key"], "selection")
    by_key = {t.key: t for t in grid_trials}
    chosen: dict[tuple, dict[str, float]] = {}
    for row in selection.itertuples(index=False):
        if row.status != "selected":
            continue
        t = by_key.get(row.trial_key)
        if t is None:
            raise ValueError(
                f"selection chose trial {row.trial_key} for {row.model} / {row.dataset} / {row.regime}, "
                "but that trial is not in the sweep's grid (was the sweep file changed since the grid ran?); "
                "select with select_best(runs, trials=grid_trials) to consider only the current grid")
        # a shared key maps to one of its cells; the cell point is the trial's own
        chosen[(row.model, row.dataset, row.regime, cell_point(row.regime, t.hparams))] = dict(t.hparams)
    out: list[TrialSpec] = []
    seen: set[tuple] = set()
    for t in grid_trials:
        if chosen.get(cell_of(t)) == dict(t.hparams):
            f = replace(t, stage="final")
            if (cell_of(f), f.key) not in seen:
                seen.add((cell_of(f), f.key))
                out.append(f)
    return out


def _hp_match(runs: pd.DataFrame, sel: pd.Series) -> np.ndarray:
    """Rows of ``runs`` whose values on the cell's regime axes equal the selection's."""
    ok = np.ones(len(runs), dtype=bool)
    for c in (a.name for a in regime_axes(str(sel["regime"]))):
        a = pd.to_numeric(runs[c], errors="coerce").to_numpy(dtype=float)
        b = float(sel[c]) if sel[c] is not None else math.nan
        ok &= (np.isnan(a) & np.isnan(b)) | np.isclose(a, b, rtol=1e-9, atol=0.0)
    return ok


def results_table(final_runs: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The results table (one row per selection cell): ``value`` is the test metric of the final run
    at the selected configuration (mean over its seeds). Cells without a selection or without a
    finished final run are kept with ``value`` NaN and ``status`` ``no_selection`` / ``no_final``."""
    _check_columns(final_runs, ["run_id", "model", "dataset", "regime", "status", "test"], "final runs table")
    _check_columns(selection, ["model", "dataset", "regime", "status", "run_id", "trial_key", "val"], "selection")
    fr = _with_optional(final_runs)
    if "stage" in fr.columns:
        fr = fr[fr["stage"] == "final"]
    groups = {cell: g for cell, g in fr.groupby(CELL_COLUMNS, sort=False)}
    rows = []
    for _, sel in selection.iterrows():
        cell = (sel["model"], sel["dataset"], sel["regime"])
        row: dict[str, Any] = {**dict(zip(CELL_COLUMNS, cell)), "source_top1": sel.get("source_top1", math.nan),
                               "metric": sel.get("metric"), "value": math.nan, "value_sd": math.nan,
                               **{a: sel.get(a, math.nan) for a in all_axis_names()},
                               "run_id": None, "grid_run_id": sel["run_id"], "val": sel["val"],
                               "status": "no_selection", "n_seeds": 0, "note": "no finished grid trial",
                               **{c: sel.get(c) for c in MODEL_FACTS},
                               "solver_converged": math.nan, "n_grid_unconverged": sel.get("n_unconverged", math.nan)}
        if sel["status"] == "selected":
            g = groups.get(cell, fr.iloc[0:0])
            g = g[_hp_match(g, sel)]
            ok = g[(g["status"] == "finished") & np.isfinite(pd.to_numeric(g["test"], errors="coerce"))]
            if ok.empty:
                seen = ", ".join(f"{s} {n}" for s, n in g["status"].value_counts().sort_index().items())
                row.update(status="no_final", note=f"final run: {seen}" if seen else "no final run")
            else:
                ok = ok.assign(_t=_time_key(ok["start_time"]),
                               _seed=pd.to_numeric(ok["seed"], errors="coerce").fillna(0))
                ok = ok.sort_values(["_seed", "_t"], kind="mergesort").drop_duplicates("_seed", keep="last")
                src = _first_finite(ok["source_top1"])
                metric = next((m for m in ok["metric"] if isinstance(m, str) and m), row["metric"])
                conv = pd.to_numeric(ok["solver_converged"], errors="coerce").dropna()
                tests = pd.to_numeric(ok["test"])
                row.update(value=float(tests.mean()), value_sd=float(tests.std(ddof=1)) if len(ok) > 1 else math.nan,
                           run_id=ok["run_id"].iloc[0],
                           status="finished", n_seeds=len(ok), note="", metric=metric,
                           solver_converged=float(conv.min()) if len(conv) else math.nan,
                           source_top1=src if math.isfinite(src) else row["source_top1"])
        rows.append(row)
    return pd.DataFrame(rows, columns=results_columns())
