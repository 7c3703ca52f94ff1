"""The final stage's glue between MLflow, selection and the report (no training here).

``final_trials_for`` reads the grid runs back from MLflow and asks ``select`` which configuration
each (model, dataset, regime) cell keeps; ``write_report`` turns the final-stage runs into the
results table and the report files, and attaches them to the sweep's parent run. ``report_cli``
rebuilds a report from MLflow alone (or from a CSV made elsewhere).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

import pandas as pd

from xfer import report_factors, report_regularizers, select, tracking
from xfer.layout import StorageLayout
from xfer.spec import SweepSpec, load_spec
from xfer.trial import TrialSpec

log = logging.getLogger(__name__)


def final_trials_for(spec: SweepSpec, uri: str, stream: IO[str] | None = None) -> list[TrialSpec]:
    """Best-on-validation per cell among this spec's grid trials → final-stage TrialSpecs. Where ASHA
    stopped trials (``search: {type: asha}``), its own pick — best among the trials it let finish — is
    tested too when an audit made the full grid pick another configuration (its final trial has its own
    key); the report compares the two (``xfer.report_asha``)."""
    out = stream or sys.stdout
    grid = spec.grid_trials()
    runs = tracking.load_runs(uri, spec.name)
    selection = select.select_best(runs, trials=grid)
    missing = selection[selection["status"] == "missing"]
    for row in missing.itertuples(index=False):
        print(f"final: no finished grid trial for {row.model} / {row.dataset} / {row.regime} — reported as missing",
              file=out)
    finals = select.final_trials(selection, grid)
    stops = tracking.asha_stops(uri, spec.name)
    if stops:
        from xfer import report_asha

        keys = {t.key for t in finals}
        extra = [t for t in select.final_trials(report_asha.asha_selection(runs, stops, grid), grid) if t.key not in keys]
        if extra:
            print(f"final: {len(extra)} cell(s) where ASHA's pick differs from the full grid's: testing both", file=out)
        finals += extra
    return finals


def asha_from_mlflow(uri: str, spec: SweepSpec | None) -> pd.DataFrame | None:
    """The ASHA comparison table (``xfer.report_asha.comparison``) of a sweep that searched with ASHA;
    None otherwise (it needs the sweep file: the steps of a full trial come from its options)."""
    if spec is None or spec.search.get("type") != "asha":
        return None
    from xfer import report_asha
    from xfer.regimes import REGIMES

    grid = spec.grid_trials()
    budgets = {t.key: REGIMES.get(t.regime).budget(t) for t in grid if REGIMES.get(t.regime).early_stopping}
    return report_asha.comparison(tracking.load_runs(uri, spec.name), tracking.asha_stops(uri, spec.name), budgets,
                                  grid)


def results_from_mlflow(uri: str, experiment: str, grid: list[TrialSpec] | None = None) -> pd.DataFrame:
    """The results table of an experiment: selection on grid runs, values from final runs."""
    runs = tracking.load_runs(uri, experiment)
    if runs.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} at {tracking.redact_uri(uri)} has no trial runs")
    selection = select.select_best(runs, trials=grid)
    return select.results_table(runs[runs["stage"] == "final"], selection)


def _predictions(uri: str, results: pd.DataFrame) -> dict[tuple[str, str, str], Any]:
    preds = {}
    for row in results.itertuples(index=False):
        if isinstance(row.run_id, str) and row.run_id:
            try:
                preds[(row.model, row.dataset, row.regime)] = tracking.load_predictions(uri, row.run_id)
            except Exception as e:  # noqa: BLE001 - significance marks are skipped for that cell, with a note
                log.warning("no predictions for %s/%s/%s (%s): %s", row.model, row.dataset, row.regime, row.run_id, e)
    return preds


def estimates_from_mlflow(uri: str, experiment: str) -> tuple[pd.DataFrame | None, dict[str, float] | None]:
    """The estimate stage's table and, to compare its cost with, the grid's seconds per regime (each grid
    run counted once); (None, None) when the sweep ran no estimators."""
    from xfer.tracking.estimates import load_estimates

    est = load_estimates(uri, experiment)
    if est.empty:
        return None, None
    runs = tracking.load_runs(uri, experiment)
    grid = runs[runs["stage"] == "grid"].drop_duplicates("run_id")
    return est, {str(k): float(v) for k, v in grid.groupby("regime")["seconds"].sum().items()}


def _curves(uri: str, results: pd.DataFrame) -> dict[str, Any]:
    """Validation curves of the grid runs selection chose (the report's convergence view)."""
    wanted = {row.grid_run_id: f"val_{row.metric}" for row in results.itertuples(index=False)
              if isinstance(getattr(row, "grid_run_id", None), str) and isinstance(row.metric, str) and row.metric}
    try:
        return tracking.load_curves(uri, wanted)
    except Exception as e:  # noqa: BLE001 - the convergence view is left out, with a note
        log.warning("no validation curves for the report: %s", e)
        return {}


def build(results: pd.DataFrame, out_dir: Path, *, uri: str | None, title: str,
          stream: IO[str] | None = None, experiment: str | None = None,
          asha: pd.DataFrame | None = None) -> dict[str, Any]:
    from xfer import report

    out = stream or sys.stdout
    preds = _predictions(uri, results) if uri else None
    est, grid_seconds = estimates_from_mlflow(uri, experiment) if uri and experiment else (None, None)
    made = report.build_report(results, out_dir, predictions=preds, title=title,
                               curves=_curves(uri, results) if uri else None, estimates=est,
                               grid_seconds=grid_seconds, asha=asha)
    for line in made.summary_lines():
        print(f"headline {line}", file=out)
    if asha is not None:
        from xfer import report_asha

        print(f"asha: {report_asha.headline(report_asha.summary(asha))}", file=out)
    if "estimators_json" in made.files:
        import json

        for regime, c in json.loads(made.files["estimators_json"].read_text())["closest"].items():
            src = "n/a" if c["source_top1_tau_w"] is None else f"{c['source_top1_tau_w']:.2f}"
            print(f"estimators: closest to the {regime} ranking: {c['estimator']} (mean weighted τ {c['tau_w']:.2f}; "
                  f"source top-1 {src})", file=out)
    print(f"report: {made.files['report_html']}", file=out, flush=True)
    return {"files": {k: str(v) for k, v in made.files.items()}, "headline": made.headline}


def write_report(spec: SweepSpec, uri: str, parent_run_id: str | None, layout: StorageLayout,
                 report_dir: str | None = None, stream: IO[str] | None = None) -> dict[str, Any]:
    out_dir = Path(report_dir) if report_dir else layout.report_dir(spec.name)
    results = results_from_mlflow(uri, spec.name, spec.grid_trials())
    results = report_regularizers.with_settings(results, spec.models)  # each model's source-training settings
    results = report_factors.with_factors(results, spec.models, spec.datasets)  # distances, stage counts
    made = build(results, out_dir, uri=uri, title=f"xfer study: {spec.name}", stream=stream, experiment=spec.name,
                 asha=asha_from_mlflow(uri, spec))
    if parent_run_id:
        tracking.log_report(uri, parent_run_id, list(made["files"].values()))
    return made


def report_cli(args) -> int:
    """`xfer report --experiment NAME` (from MLflow; ``--spec`` restricts selection to that sweep
    file's grid) or `--from-csv FILE`."""
    if args.from_csv:
        from xfer import report

        results = report.read_results_csv(args.from_csv)
        out_dir = Path(args.out or Path("reports") / Path(args.from_csv).stem)
        build(results, out_dir, uri=None, title=f"xfer report: {Path(args.from_csv).name}")
        return 0
    uri = tracking.resolve_tracking_uri(args.tracking_uri, None)
    tracking.check_reachable(uri, must_exist=True)  # a report only reads: never create a database
    spec = load_spec(args.spec) if getattr(args, "spec", None) else None
    results = results_from_mlflow(uri, args.experiment, spec.grid_trials() if spec else None)
    if spec is not None:
        results = report_regularizers.with_settings(results, spec.models)
        results = report_factors.with_factors(results, spec.models, spec.datasets)
    out_dir = Path(args.out or Path("reports") / args.experiment)
    build(results, out_dir, uri=uri, title=f"xfer study: {args.experiment}", experiment=args.experiment,
          asha=asha_from_mlflow(uri, spec))
    return 0
