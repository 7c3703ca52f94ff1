"""The tracking writer: a sweep's experiment and parent run, and the Ray Tune callback that writes
every trial's child run from the driver.

Only the Ray driver writes: SQLite does not survive concurrent writers, and a trainable stays free of
MLflow. Everything goes through ``MlflowClient`` with explicit run ids; the fluent ``mlflow.start_run``
global state is never touched, so several sweeps/tests in one process cannot log into each other's
runs. A trial key names exactly one run in its experiment, whatever invocation created it: reruns
and ``Tuner.restore`` look the run up by key and log into it again (a failed trial is retried into
the same run), so the experiment never holds two runs for one key.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ray.tune import Callback

from xfer.contract import TrialRecord
from xfer.tracking import readers, schema  # submodules (the package itself re-exports readers)
from xfer.tracking import uri as uri_mod
from xfer.tracking.schema import (MAX_PARAM_LEN, MAX_TAG_LEN, MLFLOW_STATUS, TAG_ATTEMPT, TAG_FINGERPRINT, TAG_KIND,
                                  TAG_MESSAGE, TAG_METRIC, TAG_MODELS, TAG_PARENT, TAG_STATUS, TAG_SWEEP, chunks,
                                  flatten, numeric, provenance_tags, safe_key)
from xfer.tracking.uri import TrackingError
from xfer.trial import TrialSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# What the trainable reports (see ``xfer.sweep``): per-step metrics with ``xfer_step``; the final result
# adds ``xfer_final`` and the TrialRecord as JSON in ``xfer_record`` (and ``xfer_models`` for a shared run)
FINAL = "xfer_final"
RECORD = "xfer_record"
STEP = "xfer_step"
MODELS = "xfer_models"
OBJECTIVE = "xfer_objective"  # what a searcher (Optuna) maximises
_OWN_KEYS = {FINAL, RECORD, STEP, MODELS, OBJECTIVE}

# (uri, experiment) -> parent run id of the invocation running in this process. A restored Tuner
# unpickles the callbacks it was created with (they carry the *old* parent run); they log under the
# parent of the current invocation instead.
_ACTIVE_PARENTS: dict[tuple[str, str], str] = {}


class SweepTracker:
    """One experiment per sweep name (created on first use) and the current invocation's parent run.

    Picklable (a Tuner pickles its callbacks, and with them this): the client and caches are rebuilt
    after unpickling.
    """

    def __init__(self, uri: str, experiment_name: str) -> None:
        if not experiment_name or not str(experiment_name).strip():
            raise TrackingError("the MLflow experiment name (the sweep name) must be a non-empty string")
        self.uri = uri
        self.experiment_name = experiment_name
        self._parent_run_id: str | None = None
        self._client_obj: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._by_key: dict[str, tuple[str, str]] | None = None  # key -> (run_id, status) cache

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client_obj=None, _by_key=None)
        return state

    @property
    def client(self) -> "MlflowClient":
        if self._client_obj is None:
            self._client_obj = uri_mod.client(self.uri)
        return self._client_obj

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp_id = uri_mod.experiment_id(self.client, self.experiment_name)
            if exp_id is None:
                exp_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=uri_mod.default_artifact_location(self.uri, self.experiment_name),
                    tags={TAG_SWEEP: self.experiment_name})
                log.info("created MLflow experiment %r (%s) at %s", self.experiment_name, exp_id,
                         uri_mod.redact_uri(self.uri))
            self._experiment_id = exp_id
        return self._experiment_id

    @property
    def parent_run_id(self) -> str | None:
        """The parent run of the invocation running in this process (see ``_ACTIVE_PARENTS``)."""
        return _ACTIVE_PARENTS.get((self.uri, self.experiment_name), self._parent_run_id)

    def start_parent(self, spec_summary: Mapping[str, Any], run_name: str | None = None,
                     spec_path: str | Path | None = None) -> str:
        """Open this invocation's parent run: sweep tags, provenance, the summary (e.g. ``spec.plan``)
        flattened into params, and the spec file as ``spec.yaml`` (``spec_path`` or summary["path"])."""
        name = run_name or f"{self.experiment_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {TAG_SWEEP: self.experiment_name, TAG_KIND: "sweep", **provenance_tags()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Param

        flat = {k: v for k, v in flatten(spec_summary).items() if v is not None and k != "path"}
        params = list({safe_key(k): Param(safe_key(k), schema._fmt(v)[:MAX_PARAM_LEN]) for k, v in flat.items()}.values())
        for chunk in chunks(params):
            self.client.log_batch(run_id, params=chunk)
        path = spec_path or spec_summary.get("path")
        if path:
            p = Path(path)
            if not p.is_file():
                raise TrackingError(f"spec file {p} does not exist (needed to log it as spec.yaml)")
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / "spec.yaml"
                dst.write_bytes(p.read_bytes())
                self.client.log_artifact(run_id, str(dst))
        self._parent_run_id = run_id
        _ACTIVE_PARENTS[(self.uri, self.experiment_name)] = run_id
        log.info("MLflow parent run %s (%s) in experiment %r", run_id, name, self.experiment_name)
        return run_id

    def end_parent(self, status: str = "finished") -> None:
        """Close the parent run: ``finished`` | ``failed`` | ``killed`` (or MLflow's upper-case names)."""
        if self._parent_run_id is None:
            return
        mlflow_status = MLFLOW_STATUS.get(status.lower(), status.upper())
        if mlflow_status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"unknown run status {status!r}; valid: finished, failed, killed")
        self.client.set_terminated(self._parent_run_id, status=mlflow_status)
        if _ACTIVE_PARENTS.get((self.uri, self.experiment_name)) == self._parent_run_id:
            del _ACTIVE_PARENTS[(self.uri, self.experiment_name)]

    def existing(self, trial_keys: Iterable[str] | None = None, refresh: bool = True) -> dict[str, tuple[str, str]]:
        """``key -> (run_id, xfer status)`` for keys that already have a run in the experiment, under
        any parent (``None``: all keys). Status is running | finished | diverged | failed."""
        if refresh or self._by_key is None:
            runs = readers.runs_by_key(readers.iter_trial_runs(self.client, self.experiment_id))
            self._by_key = {k: (r.info.run_id, r.data.tags.get(TAG_STATUS, "running")) for k, r in runs.items()}
        if trial_keys is None:
            return dict(self._by_key)
        return {k: self._by_key[k] for k in trial_keys if k in self._by_key}

    def lookup(self, key: str) -> tuple[str, str] | None:
        """The run for one key, from a cache filled by one search (the driver is the only writer, and
        ``remember`` keeps the cache current)."""
        if self._by_key is None:
            self.existing(None)
        return self._by_key.get(key)  # type: ignore[union-attr]

    def remember(self, key: str, run_id: str, status: str) -> None:
        if self._by_key is None:
            self.existing(None)
        self._by_key[key] = (run_id, status)  # type: ignore[index]

    def callback(self) -> "TrackingCallback":
        return TrackingCallback(self)



def _ray_bookkeeping_keys() -> set[str]:
    from ray.tune import result as r

    keys = set(r.AUTO_RESULT_KEYS) | set(r.DEBUG_METRICS) | set(r.DEFAULT_EXPERIMENT_INFO_KEYS)
    keys |= {r.DONE, r.TRIAL_ID, r.EXPERIMENT_TAG, r.TRAINING_ITERATION, r.TIMESTAMP, r.TIME_THIS_ITER_S,
             r.SHOULD_CHECKPOINT, r.RESULT_DUPLICATE, r.TRIAL_INFO, r.STDOUT_FILE, r.STDERR_FILE}
    return keys


class TrackingCallback(Callback):
    """Writes each trial's child run from the Tune driver.

    on_trial_start: create the run, or reuse the run the trial's key already has (a failed trial of
    an earlier invocation, a restored Tuner, a restarted actor) and re-parent it to the current
    invocation. on_trial_result: numeric metrics at ``step=result["xfer_step"]``; the final result
    (``xfer_final``) carries the ``TrialRecord``: status, message, metric, fingerprints, artifacts,
    timings; it closes the run. on_trial_error / a completion without a final result: ``failed``.
    """

    def __init__(self, tracker: SweepTracker) -> None:
        self.tracker = tracker
        self._runs: dict[str, str] = {}  # Ray trial_id -> MLflow run_id
        self._keys: dict[str, str] = {}  # Ray trial_id -> trial key
        self._steps: dict[str, int] = {}  # last step logged per trial
        # trial ids started by this process whose run is still open (not persisted: after a restore,
        # trials that finished before must never be touched again)
        self._open: set[str] = set()
        self._skip = _ray_bookkeeping_keys() | _OWN_KEYS

    # -- Tune state (saved in experiment checkpoints, handed back on Tuner.restore) --------------
    def get_state(self) -> dict[str, Any] | None:
        return {"runs": dict(self._runs), "keys": dict(self._keys)} if self._runs else None

    def set_state(self, state: dict[str, Any]) -> None:
        self._runs.update(state.get("runs", {}))
        self._keys.update(state.get("keys", {}))

    @property
    def client(self) -> "MlflowClient":
        return self.tracker.client

    # -- hooks -----------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._runs.get(trial.trial_id) or self._start(trial)
        step = int(result.get(STEP, result.get("training_iteration", self._steps.get(trial.trial_id, 0))))
        self._steps[trial.trial_id] = step
        if result.get(FINAL):
            self._finish(trial, run_id, result, step)
        else:
            self._log_metrics(run_id, {k: v for k, v in result.items() if k not in self._skip}, step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._open or trial.trial_id not in self._runs:
            run_id = self._runs.get(trial.trial_id) or self._start(trial)
            self._fail(trial, run_id, "the trial ended without a final result (stopped early or killed)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = _read_error(getattr(trial, "error_file", None))
        if trial.trial_id in self._runs and trial.trial_id not in self._open:
            run_id = self._runs[trial.trial_id]
            # the trial had already reported its result; keep it, but say what went wrong afterwards
            log.warning("trial %s errored after its final result: %s", self._keys.get(trial.trial_id), text)
            self.client.set_tag(run_id, "xfer.error_after_result", _last_line(text)[:MAX_TAG_LEN])
            return
        run_id = self._runs.get(trial.trial_id) or self._start(trial)
        self._log_error_file(run_id, getattr(trial, "error_file", None))
        self._fail(trial, run_id, _last_line(text) or "the trial raised an error (see error.txt)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.trial_id in self._open:
                self._fail(trial, self._runs[trial.trial_id], "the sweep ended before the trial finished")

    # -- internals -------------------------------------------------------------------------------
    def _start(self, trial: Any) -> str:
        from mlflow.entities import Param, RunTag

        spec = TrialSpec.from_config(trial.config)
        key = self._keys.get(trial.trial_id) or spec.key
        self._keys[trial.trial_id] = key
        parent = self.tracker.parent_run_id
        tags = {**schema.trial_tags(spec, key), TAG_STATUS: "running", "xfer.ray_trial_id": trial.trial_id,
                **provenance_tags()}
        if parent:
            tags[TAG_PARENT] = parent
        params = schema.trial_params(spec)

        known = self._runs.get(trial.trial_id)
        found = self.tracker.lookup(key)
        run_id = known or (found[0] if found else None)
        if run_id is None:
            run = self.client.create_run(self.tracker.experiment_id, run_name=schema.run_name(spec),
                                         tags={**tags, TAG_ATTEMPT: "1"})
            run_id = run.info.run_id
            new_params = params
            log.debug("created run %s for trial %s", run_id, key)
        else:
            old = self.client.get_run(run_id)
            attempt = int(old.data.tags.get(TAG_ATTEMPT, "1") or 1) + 1
            tags[TAG_ATTEMPT] = str(attempt)
            self.client.update_run(run_id, status="RUNNING")
            new_params = {}
            for k, v in params.items():
                before = old.data.params.get(k)
                if before is None:
                    new_params[k] = v
                elif before != v:  # MLflow params are write-once
                    log.warning("run %s: param %s was %r, now %r (not a key field); keeping the first value",
                                run_id, k, before, v)
            log.info("reusing run %s for trial %s (attempt %d)", run_id, key, attempt)
        for chunk in chunks([RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in chunks([Param(k, v) for k, v in new_params.items()]):
            self.client.log_batch(run_id, params=chunk)
        self._runs[trial.trial_id] = run_id
        self._open.add(trial.trial_id)
        self.tracker.remember(key, run_id, "running")
        return run_id

    def _log_metrics(self, run_id: str, values: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(safe_key(k), x, now, step) for k, v in values.items()
                   if not k.startswith("_") and (x := numeric(v)) is not None]
        for chunk in chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def _finish(self, trial: Any, run_id: str, result: Mapping[str, Any], step: int) -> None:
        record = TrialRecord.from_json(json.loads(result[RECORD]))
        self._log_metrics(run_id, {**record.metrics, "trial_seconds": record.seconds}, step)
        tags = {TAG_STATUS: record.status, TAG_MESSAGE: record.message[:MAX_TAG_LEN]}
        if record.metric:
            tags[TAG_METRIC] = record.metric
        for name, fp in record.fingerprints.items():
            tags[f"{TAG_FINGERPRINT}{name}"] = str(fp)
        if result.get(MODELS):
            tags[TAG_MODELS] = str(result[MODELS])[:MAX_TAG_LEN]
        for name, path in record.artifacts.items():
            tags[f"xfer.artifact.{name}"] = str(path)[:MAX_TAG_LEN]
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for name, path in record.artifacts.items():
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p))
            else:
                # e.g. a worker-local path on a cluster without shared storage: the tag keeps the path
                log.warning("trial %s: artifact %s at %s is not visible from the driver; not logged",
                            self._keys[trial.trial_id], name, path)
        self._close(trial, run_id, record.status)

    def _fail(self, trial: Any, run_id: str, message: str) -> None:
        self.client.set_tag(run_id, TAG_STATUS, "failed")
        self.client.set_tag(run_id, TAG_MESSAGE, message[:MAX_TAG_LEN])
        self._close(trial, run_id, "failed")

    def _close(self, trial: Any, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=MLFLOW_STATUS[status])
        self._open.discard(trial.trial_id)
        self.tracker.remember(self._keys[trial.trial_id], run_id, status)

    def _log_error_file(self, run_id: str, error_file: str | None) -> None:
        if error_file and Path(error_file).is_file():
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / "error.txt"
                dst.write_bytes(Path(error_file).read_bytes())
                self.client.log_artifact(run_id, str(dst))


def _read_error(error_file: str | None) -> str:
    if error_file and Path(error_file).is_file():
        return Path(error_file).read_text(errors="replace")
    return ""


def _last_line(text: str) -> str:
    """The exception line of a traceback (``RuntimeError: boom``), else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln):
            return ln
    return lines[-1] if lines else ""
