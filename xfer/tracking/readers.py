"""Reading a sweep back from MLflow: runs by trial key, the runs table, finished keys, predictions;
and attaching report files to a sweep's parent run. Needs MLflow, never Ray."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import numpy as np

from xfer.contract import RESULT_STATUSES
from xfer.regimes import all_axis_names
from xfer.tracking import schema
from xfer.tracking.schema import TAG_KEY, TAG_STATUS
from xfer.tracking.uri import TrackingError, client as _client, experiment_id as _experiment_id, require_experiment

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

_PAGE = 1000  # runs per search page


def iter_trial_runs(client: "MlflowClient", experiment_id: str, extra_filter: str = "") -> Iterator["Run"]:
    """Every child (trial) run of the experiment, page by page (experiments hold thousands of runs;
    MLflow has no ``IN`` for tags, so search once and filter in Python)."""
    filt = f"tags.`{TAG_KEY}` IS NOT NULL" + (f" AND {extra_filter}" if extra_filter else "")
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filt, max_results=_PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


_STATUS_RANK = {"finished": 0, "diverged": 1, "stopped": 2, "failed": 3, "running": 4}


def _pick(runs: list["Run"]) -> "Run":
    """The run that stands for a key when an older tool left several: a result beats a retry, then
    the newest."""
    return sorted(runs, key=lambda r: (_STATUS_RANK.get(r.data.tags.get(TAG_STATUS, ""), 5),
                                       -(r.info.start_time or 0)))[0]


def runs_by_key(runs: Iterable["Run"]) -> dict[str, "Run"]:
    grouped: dict[str, list[Run]] = {}
    for r in runs:
        grouped.setdefault(r.data.tags[TAG_KEY], []).append(r)
    out = {}
    for key, rs in grouped.items():
        if len(rs) > 1:
            log.warning("trial key %s has %d MLflow runs (%s); using %s", key, len(rs),
                        ", ".join(r.info.run_id for r in rs), _pick(rs).info.run_id)
        out[key] = _pick(rs)
    return out


def load_runs(uri: str, experiment: str) -> "pd.DataFrame":
    """The runs table (one row per child run and model; parent runs excluded), columns
    ``schema.runs_columns()``: the base columns plus one per grid axis of any registered regime.

    ``status`` is finished | diverged | failed, or running for a trial in progress / interrupted.
    ``stage`` is grid | final (| pretrain for source-training runs). Axis columns are floats (NaN where
    the run's regime has no such axis); ``source_top1`` comes from the run's metric, else the model's
    ``source_top1`` param (for a shared run, from ``xfer.models``).
    """
    import pandas as pd

    client = _client(uri)
    exp_id = require_experiment(client, uri, experiment)
    rows = [row for r in iter_trial_runs(client, exp_id) for row in schema.rows(r)]
    df = pd.DataFrame(rows, columns=schema.runs_columns())
    for c in ["val", "test", "source_top1", "solver_converged", "seconds", *all_axis_names()]:
        df[c] = df[c].astype(float)
    df["seed"] = df["seed"].astype("Int64")
    df["start_time"] = pd.to_datetime(df["start_time"], utc=True)
    return df.sort_values(["model", "dataset", "regime", "stage", "start_time"], kind="stable").reset_index(drop=True)


def _stage_runs(uri: str, experiment: str, stage: str) -> dict[str, "Run"]:
    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    if exp_id is None:
        return {}
    return runs_by_key(iter_trial_runs(client, exp_id, f"tags.`xfer.stage` = '{stage}'"))


def finished_keys(uri: str, experiment: str, stage: str = "grid",
                  statuses: Iterable[str] = RESULT_STATUSES) -> set[str]:
    """Keys of ``stage`` trials that have a result (finished or diverged; ``statuses`` to count others,
    e.g. ``stopped`` under ASHA): a rerun skips them; failed ones run again, into the same MLflow run.
    No experiment yet → nothing finished."""
    wanted = set(statuses)
    return {k for k, r in _stage_runs(uri, experiment, stage).items() if r.data.tags.get(TAG_STATUS) in wanted}


def asha_stops(uri: str, experiment: str) -> dict[str, int]:
    """Grid trial key → the step ASHA stopped it at (``schema.TAG_ASHA_STOP``), whether it is still
    ``stopped`` or an audit has since run it to the end."""
    return {k: int(float(r.data.tags[schema.TAG_ASHA_STOP])) for k, r in _stage_runs(uri, experiment, "grid").items()
            if schema.TAG_ASHA_STOP in r.data.tags}


def load_curves(uri: str, metric_by_run: Mapping[str, str]) -> dict[str, list[tuple[int, float]]]:
    """Per-step history of one metric per run (``{run_id: "val_top1"}``) → ``{run_id: [(step, value), …]}``
    in step order (one value per step: the last logged). Runs without that metric are left out."""
    client = _client(uri)
    out: dict[str, list[tuple[int, float]]] = {}
    for run_id, key in metric_by_run.items():
        last: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in last or m.timestamp >= last[m.step][0]:
                last[int(m.step)] = (m.timestamp, float(m.value))
        if last:
            out[run_id] = [(s, v) for s, (_, v) in sorted(last.items())]
    return out


def load_predictions(uri: str, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [N, C], targets [N] or [N, C])`` from a final-stage run's ``predictions.npz``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file spams the report log
    client = _client(uri)
    names = [f.path for f in client.list_artifacts(run_id)]
    if "predictions.npz" not in names:
        raise TrackingError(f"run {run_id} has no predictions.npz artifact (only final-stage runs keep per-example "
                            f"test outputs); its artifacts: {', '.join(names) or '(none)'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "predictions.npz", dst_path=tmp)
        with np.load(path) as npz:
            missing = [a for a in ("scores", "targets") if a not in npz.files]
            if missing:
                raise TrackingError(f"run {run_id}: predictions.npz lacks {', '.join(missing)} "
                                    f"(has {', '.join(npz.files)})")
            return np.array(npz["scores"]), np.array(npz["targets"])


def log_report(uri: str, parent_run_id: str, files: Iterable[str | Path], artifact_path: str = "report") -> None:
    """Attach report files (tables, plots; folders too) to a sweep's parent run under ``report/``."""
    client = _client(uri)
    for f in files:
        p = Path(f)
        if p.is_dir():
            client.log_artifacts(parent_run_id, str(p), artifact_path=f"{artifact_path}/{p.name}")
        elif p.is_file():
            client.log_artifact(parent_run_id, str(p), artifact_path=artifact_path)
        else:
            raise TrackingError(f"report file {p} does not exist")


