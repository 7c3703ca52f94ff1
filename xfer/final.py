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

from xfer import report_regularizers, select, tracking
from xfer.layout import StorageLayout
from xfer.spec import SweepSpec, load_spec
from xfer.trial import TrialSpec

log = logging.getLogger(__name__)


def final_trials_for(spec: SweepSpec, uri: str, stream: IO[str] | None = None) -> list[TrialSpec]:
    """Best-on-validation per cell among this spec's grid trials → final-stage TrialSpecs."""
    out = stream or sys.stdout
    grid = spec.grid_trials()
    selection = select.select_best(tracking.load_runs(uri, spec.name), trials=grid)
    missing = selection[selection["status"] == "missing"]
    for row in missing.itertuples(index=False):
        print(f"final: no finished grid trial for {row.model} / {row.dataset} / {row.regime} — reported as missing",
              file=out)
    return select.final_trials(selection, grid)


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


def build(results: pd.DataFrame, out_dir: Path, *, uri: str | None, title: str,
          stream: IO[str] | None = None) -> dict[str, Any]:
    from xfer import report

    out = stream or sys.stdout
    preds = _predictions(uri, results) if uri else None
    made = report.build_report(results, out_dir, predictions=preds, title=title)
    for line in made.summary_lines():
        print(f"headline {line}", file=out)
    print(f"report: {made.files['report_html']}", file=out, flush=True)
    return {"files": {k: str(v) for k, v in made.files.items()}, "headline": made.headline}


def write_report(spec: SweepSpec, uri: str, parent_run_id: str | None, layout: StorageLayout,
                 report_dir: str | None = None, stream: IO[str] | None = None) -> dict[str, Any]:
    out_dir = Path(report_dir) if report_dir else layout.report_dir(spec.name)
    results = results_from_mlflow(uri, spec.name, spec.grid_trials())
    results = report_regularizers.with_settings(results, spec.models)  # each model's source-training settings
    made = build(results, out_dir, uri=uri, title=f"xfer study: {spec.name}", stream=stream)
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
    out_dir = Path(args.out or Path("reports") / args.experiment)
    build(results, out_dir, uri=uri, title=f"xfer study: {args.experiment}")
    return 0
