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
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from ray.tune import Callback

from xfer.contract import TrialRecord
from xfer.io import sha256_file
from xfer.tracking import bulk, readers, schema  # submodules (the package itself re-exports readers)
from xfer.tracking import uri as uri_mod
from xfer.tracking.schema import (MAX_PARAM_LEN, MAX_TAG_LEN, MLFLOW_STATUS, TAG_ASHA_STOP, TAG_ATTEMPT,
                                  TAG_FINGERPRINT, TAG_KIND,
                                  TAG_MESSAGE, TAG_METRIC, TAG_MODELS, TAG_PARENT, TAG_STATUS, TAG_SWEEP, chunks,
                                  flatten, numeric, provenance_tags, safe_key)
from xfer.tracking.journal import Journal
from xfer.tracking.uri import TrackingError, is_outage
from xfer.trial import TrialSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# What the trainable reports (see ``xfer.sweep``): per-step metrics with ``xfer_step``; the final result
# adds ``xfer_final`` and the TrialRecord as JSON in ``xfer_record`` (and ``xfer_models`` for a shared run).
# A Ray trial that ran a batch of trials (a regime solving several grid points at once, e.g. the probe's
# λ path) reports them all in ``xfer_batch``: one entry, and one MLflow run, per trial key.
FINAL = "xfer_final"
RECORD = "xfer_record"
STEP = "xfer_step"
MODELS = "xfer_models"
BATCH = "xfer_batch"
OBJECTIVE = "xfer_objective"  # what a searcher (Optuna) maximises
VAL = "xfer_val"  # the validation metric, only in the reports that carry one: what ASHA compares at a rung
_OWN_KEYS = {FINAL, RECORD, STEP, MODELS, BATCH, OBJECTIVE, VAL}


def final_entries(config: Mapping[str, Any], result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trial results a final report carries: ``{key, trial, record, models, step}`` each (``record``
    is the TrialRecord's JSON text, ``trial`` the TrialSpec dict)."""
    if result.get(BATCH):
        return [dict(e, key=TrialSpec.from_dict(e["trial"]).key) for e in json.loads(result[BATCH])]
    spec = TrialSpec.from_config(config)
    return [{"key": spec.key, "trial": spec.to_dict(), "record": result[RECORD], "models": result.get(MODELS),
             "step": int(result.get(STEP, 0))}]


def is_batch(config: Mapping[str, Any]) -> bool:
    return bool((config.get("trial") or {}).get(BATCH))
# the driver's MLflow client gives up on an unreachable server in seconds (MLflow's defaults retry for
# minutes); results are journaled meanwhile, so nothing waits on it. The user's own settings win.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

# (uri, experiment) -> parent run id of the invocation running in this process. A restored Tuner
# unpickles the callbacks it was created with (they carry the *old* parent run); they log under the
# parent of the current invocation instead.
_ACTIVE_PARENTS: dict[tuple[str, str], str] = {}


class SweepTracker:
    """One experiment per sweep name (created on first use) and the current invocation's parent run.

    Picklable (a Tuner pickles its callbacks, and with them this): the client and caches are rebuilt
    after unpickling.
    """

    def __init__(self, uri: str, experiment_name: str, journal_dir: Path | None = None) -> None:
        if not experiment_name or not str(experiment_name).strip():
            raise TrackingError("the MLflow experiment name (the sweep name) must be a non-empty string")
        self.uri = uri
        self.experiment_name = experiment_name
        self.journal = Journal(journal_dir) if journal_dir is not None else None
        for name, value in FAIL_FAST_HTTP.items():  # an outage shows in seconds, not after minutes of retries
            os.environ.setdefault(name, value)
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
        path = spec_path or spec_summary.get("path")
        if path and Path(path).is_file():  # what reproduces the study, beside the file itself (spec.yaml)
            tags["xfer.spec_sha256"] = sha256_file(Path(path))
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Param

        flat = {k: v for k, v in flatten(spec_summary).items() if v is not None and k != "path"}
        params = list({safe_key(k): Param(safe_key(k), schema._fmt(v)[:MAX_PARAM_LEN]) for k, v in flat.items()}.values())
        for chunk in chunks(params):
            self.client.log_batch(run_id, params=chunk)
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

    def callback(self, early_stop: "EarlyStops | None" = None) -> "TrackingCallback":
        return TrackingCallback(self, early_stop)

    def flush_journal(self, wait_s: float = 0.0, stream: IO[str] | None = None) -> int:
        """Log the journal's waiting results to MLflow; with ``wait_s``, keep trying (every few seconds)
        until they are all in or the time is up. Returns how many are still waiting."""
        if self.journal is None or not len(self.journal):
            return 0
        cb = self.callback()
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            left = cb.flush()
            if not left or time.monotonic() >= deadline:
                return left
            if not said and stream is not None:
                print(f"tracking: waiting for the MLflow server at {uri_mod.redact_uri(self.uri)} to log {left} result(s) kept in "
                      f"{self.journal.folder} (up to {wait_s:.0f}s)", file=stream, flush=True)
                said = True
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _ray_bookkeeping_keys() -> set[str]:
    from ray.tune import result as r

    keys = set(r.AUTO_RESULT_KEYS) | set(r.DEBUG_METRICS) | set(r.DEFAULT_EXPERIMENT_INFO_KEYS)
    keys |= {r.DONE, r.TRIAL_ID, r.EXPERIMENT_TAG, r.TRAINING_ITERATION, r.TIMESTAMP, r.TIME_THIS_ITER_S,
             r.SHOULD_CHECKPOINT, r.RESULT_DUPLICATE, r.TRIAL_INFO, r.STDOUT_FILE, r.STDERR_FILE}
    return keys


class EarlyStops(Protocol):
    """What a scheduler that stops trials early (``xfer.asha.CellASHA``) shares with the callback, in the
    driver: trial key → (step, validation value) of each trial it stopped."""

    stopped: dict[str, tuple[int, float]]


class TrackingCallback(Callback):
    """Writes each trial's child run from the Tune driver.

    on_trial_start: create the run, or reuse the run the trial's key already has (a failed trial of
    an earlier invocation, a restored Tuner, a restarted actor) and re-parent it to the current
    invocation. on_trial_result: numeric metrics at ``step=result["xfer_step"]``; the final result
    (``xfer_final``) carries the ``TrialRecord``: status, message, metric, fingerprints, artifacts,
    timings; it closes the run. on_trial_error / a completion without a final result: ``failed`` —
    unless ``early_stop`` says its scheduler stopped it: ``stopped`` (MLflow KILLED) with the step in
    ``xfer.asha_stopped_step``, never a result.

    A tracking server that goes away never stops the sweep: the final result is first written to the
    tracker's journal (durable, on the sweep's storage), metrics that could not be sent are kept with
    it, one warning line says so, and the journal is logged once the server answers again (retried at
    most every ``RETRY_S`` seconds and at the end of the stage).
    """

    RETRY_S = 15.0

    def __init__(self, tracker: SweepTracker, early_stop: EarlyStops | None = None) -> None:
        self.tracker = tracker
        self.early_stop = early_stop
        self._runs: dict[str, str] = {}  # Ray trial_id -> MLflow run_id
        self._keys: dict[str, str] = {}  # Ray trial_id -> trial key
        self._steps: dict[str, int] = {}  # last step logged per trial
        # trial ids started by this process whose run is still open (not persisted: after a restore,
        # trials that finished before must never be touched again)
        self._open: set[str] = set()
        self._finished: set[str] = set()  # trial ids whose final result came (logged or journaled)
        self._unsent: dict[str, list[tuple[str, float, int]]] = {}  # metrics not logged (server away)
        self._skip = _ray_bookkeeping_keys() | _OWN_KEYS
        self._down_since: float | None = None
        self._last_try = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_unsent={}, _down_since=None, _last_try=0.0)
        return state

    # -- Tune state (saved in experiment checkpoints, handed back on Tuner.restore) --------------
    def get_state(self) -> dict[str, Any] | None:
        if not (self._runs or self._finished):
            return None
        return {"runs": dict(self._runs), "keys": dict(self._keys), "finished": sorted(self._finished)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._runs.update(state.get("runs", {}))
        self._keys.update(state.get("keys", {}))
        self._finished.update(state.get("finished", []))

    @property
    def client(self) -> "MlflowClient":
        return self.tracker.client

    # -- hooks -----------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._keys.setdefault(trial.trial_id, TrialSpec.from_config(trial.config).key)
        if not is_batch(trial.config):  # a batch's runs are written per trial when its results come
            self._guard(self._start, trial)
        self._maybe_flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get(STEP, result.get("training_iteration", self._steps.get(trial.trial_id, 0))))
        self._steps[trial.trial_id] = step
        if result.get(FINAL):
            self._final(trial, result, step)
            return
        values = {k: v for k, v in result.items() if k not in self._skip}
        run_id = self._runs.get(trial.trial_id) or self._guard(self._start, trial)
        if run_id is None or not self._guard(self._log_metrics, run_id, values, step, ok=True):
            self._unsent.setdefault(trial.trial_id, []).extend(
                (k, x, step) for k, v in values.items() if (x := numeric(v)) is not None)
        self._maybe_flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._finished:
            return
        stop = self.early_stop.stopped.get(self._keys[trial.trial_id]) if self.early_stop is not None else None
        if stop is not None:
            self._guard(self._stop, trial, *stop)
        else:
            self._guard(self._fail, trial, "the trial ended without a final result (stopped early or killed)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = _read_error(getattr(trial, "error_file", None))
        if trial.trial_id in self._finished:
            # the trial had already reported its result; keep it, but say what went wrong afterwards
            log.warning("trial %s errored after its final result: %s", self._keys.get(trial.trial_id), text)
            if trial.trial_id in self._runs:
                self._guard(self.client.set_tag, self._runs[trial.trial_id], "xfer.error_after_result",
                            _last_line(text)[:MAX_TAG_LEN])
            return
        self._guard(self._error, trial, text)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.trial_id in self._open:
                self._guard(self._fail, trial, "the sweep ended before the trial finished")
        self.flush()

    # -- outages ---------------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., Any], *args: Any, ok: Any = None) -> Any:
        """Call ``fn``; an unreachable tracking server is noted (one line per outage) instead of raised.
        Returns ``fn``'s value (or ``ok`` when given and it succeeded), None when the server is away."""
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 - only an outage is absorbed; anything else propagates
            if not is_outage(e):
                raise
            self._outage(e)
            return None
        self._back()
        return ok if ok is not None else value

    def _outage(self, e: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            where = self.tracker.journal.folder if self.tracker.journal is not None else "memory (no journal)"
            log.warning("MLflow tracking server at %s is unreachable (%s); trials go on, their results are kept "
                        "in %s and logged when it is back", uri_mod.redact_uri(self.tracker.uri), _last_line(str(e)) or type(e).__name__,
                        where)
        self._last_try = time.monotonic()

    def _back(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow tracking server at %s is back after %.0fs", uri_mod.redact_uri(self.tracker.uri),
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _maybe_flush(self) -> None:
        if self.tracker.journal is not None and time.monotonic() - self._last_try >= self.RETRY_S and \
                len(self.tracker.journal):
            self.flush()

    def flush(self) -> int:
        """Log every journaled result whose run can be written now; returns how many still wait."""
        journal = self.tracker.journal
        if journal is None:
            return 0
        self._last_try = time.monotonic()
        entries = journal.entries()
        for n, entry in enumerate(entries):
            if self._guard(self._write_entry, entry, ok=True) is None:
                return len(entries) - n
            journal.remove(entry["key"])
        if entries:
            log.info("tracking journal: logged %d waiting result(s) to MLflow", len(entries))
        return 0

    # -- internals -------------------------------------------------------------------------------
    def _final(self, trial: Any, result: Mapping[str, Any], step: int) -> None:
        """Journal each final result first (durable), then log it; an entry goes once MLflow has it."""
        journal = self.tracker.journal
        unsent = self._unsent.pop(trial.trial_id, [])
        entries = final_entries(trial.config, result)
        for entry in entries:
            entry.update(ray_trial_id=trial.trial_id, unsent=unsent, run_id=self._runs.get(trial.trial_id)
                         if not is_batch(trial.config) else None)
        for entry in entries if journal is not None else ():
            journal.put(entry)
        if self._guard(self._write_entries, entries, ok=True) is not None:
            for entry in entries if journal is not None else ():
                journal.remove(entry["key"])
        elif journal is None:
            for entry in entries:
                log.error("trial %s: result not logged and no journal to keep it (%s)", entry["key"], entry["record"])
        self._open.discard(trial.trial_id)  # its results are logged or safe in the journal
        self._finished.add(trial.trial_id)

    def _write_entries(self, entries: list[Mapping[str, Any]]) -> None:
        """Log finished results: the ones with no run yet in bulk (``xfer.tracking.bulk``: one transaction
        on a SQL store), the others (a run to reuse, artifacts to upload) one by one."""
        fresh = [e for e in entries if not e.get("run_id") and self.tracker.lookup(e["key"]) is None
                 and not TrialRecord.from_json(json.loads(e["record"])).artifacts]
        fresh_keys = {e["key"] for e in fresh}
        if fresh:
            news = [self._new_run(e) for e in fresh]
            for e, run_id, new in zip(fresh, bulk.create_runs(self.client, self.tracker.experiment_id, news), news):
                self.tracker.remember(e["key"], run_id, new.tags[TAG_STATUS])
        for entry in entries:
            if entry["key"] not in fresh_keys:
                self._write_entry(entry)

    def _new_run(self, entry: Mapping[str, Any]) -> "bulk.NewRun":
        """A finished result as a complete new run: the tags, params and metrics ``_open_run`` and
        ``_finish`` would write."""
        spec = TrialSpec.from_dict(entry["trial"])
        record = TrialRecord.from_json(json.loads(entry["record"]))
        tags = {**self._start_tags(spec, entry["key"], entry.get("ray_trial_id", "")), TAG_ATTEMPT: "1",
                **self._finish_tags(record, entry.get("models"))}
        step = int(entry["step"])
        metrics = [(safe_key(k), float(v), int(s)) for k, v, s in entry["unsent"]]
        metrics += [(safe_key(k), x, step) for k, v in {**record.metrics, "trial_seconds": record.seconds}.items()
                    if not k.startswith("_") and (x := numeric(v)) is not None]
        return bulk.NewRun(run_name=schema.run_name(spec), status=MLFLOW_STATUS[record.status],
                           tags={k: str(v)[:MAX_TAG_LEN] for k, v in tags.items()},
                           params=schema.trial_params(spec), metrics=metrics)

    def _write_entry(self, entry: Mapping[str, Any]) -> None:
        """Everything a finished trial's run needs, from a journal entry (idempotent: reruns find the run)."""
        from mlflow.entities import Metric

        spec = TrialSpec.from_dict(entry["trial"])
        run_id = entry.get("run_id") or self._open_run(spec, entry["key"], entry.get("ray_trial_id", ""))
        unsent = [Metric(safe_key(k), float(v), int(time.time() * 1000), int(step)) for k, v, step in entry["unsent"]]
        for chunk in chunks(unsent, 1000):
            self.client.log_batch(run_id, metrics=chunk)
        self._finish(run_id, entry["key"], TrialRecord.from_json(json.loads(entry["record"])), entry.get("models"),
                     int(entry["step"]))

    def _start(self, trial: Any) -> str:
        spec = TrialSpec.from_config(trial.config)
        key = self._keys.setdefault(trial.trial_id, spec.key)
        run_id = self._open_run(spec, key, trial.trial_id, known=self._runs.get(trial.trial_id))
        self._runs[trial.trial_id] = run_id
        self._open.add(trial.trial_id)
        return run_id

    def _start_tags(self, spec: TrialSpec, key: str, ray_trial_id: str) -> dict[str, str]:
        tags = {**schema.trial_tags(spec, key), TAG_STATUS: "running", "xfer.ray_trial_id": ray_trial_id,
                **provenance_tags()}
        if self.tracker.parent_run_id:
            tags[TAG_PARENT] = self.tracker.parent_run_id
        return tags

    @staticmethod
    def _finish_tags(record: TrialRecord, models: str | None) -> dict[str, str]:
        tags = {TAG_STATUS: record.status, TAG_MESSAGE: record.message[:MAX_TAG_LEN]}
        if record.metric:
            tags[TAG_METRIC] = record.metric
        for name, fp in record.fingerprints.items():
            tags[f"{TAG_FINGERPRINT}{name}"] = str(fp)
        if models:
            tags[TAG_MODELS] = str(models)[:MAX_TAG_LEN]
        for name, path in record.artifacts.items():
            tags[f"xfer.artifact.{name}"] = str(path)[:MAX_TAG_LEN]
        return tags

    def _open_run(self, spec: TrialSpec, key: str, ray_trial_id: str, known: str | None = None) -> str:
        """Create the key's run, or reuse the one it has (re-parented to this invocation)."""
        from mlflow.entities import Param, RunTag

        tags = self._start_tags(spec, key, ray_trial_id)
        params = schema.trial_params(spec)
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
        self.tracker.remember(key, run_id, "running")
        for chunk in chunks([RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in chunks([Param(k, v) for k, v in new_params.items()]):
            self.client.log_batch(run_id, params=chunk)
        return run_id

    def _log_metrics(self, run_id: str, values: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(safe_key(k), x, now, step) for k, v in values.items()
                   if not k.startswith("_") and (x := numeric(v)) is not None]
        for chunk in chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def _finish(self, run_id: str, key: str, record: TrialRecord, models: str | None, step: int) -> None:
        from mlflow.entities import RunTag

        self._log_metrics(run_id, {**record.metrics, "trial_seconds": record.seconds}, step)
        tags = self._finish_tags(record, models)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for name, path in record.artifacts.items():
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p))
            else:
                # e.g. a worker-local path on a cluster without shared storage: the tag keeps the path
                log.warning("trial %s: artifact %s at %s is not visible from the driver; not logged", key, name, path)
        self.client.set_terminated(run_id, status=MLFLOW_STATUS[record.status])
        self.tracker.remember(key, run_id, record.status)

    def _error(self, trial: Any, text: str) -> None:
        run_id = self._runs.get(trial.trial_id) or self._start(trial)
        self._log_error_file(run_id, getattr(trial, "error_file", None))
        self._fail(trial, _last_line(text) or "the trial raised an error (see error.txt)")

    def _fail(self, trial: Any, message: str) -> None:
        run_id = self._runs.get(trial.trial_id) or self._start(trial)
        self.client.set_tag(run_id, TAG_STATUS, "failed")
        self.client.set_tag(run_id, TAG_MESSAGE, message[:MAX_TAG_LEN])
        self.client.set_terminated(run_id, status=MLFLOW_STATUS["failed"])
        self._open.discard(trial.trial_id)
        self.tracker.remember(self._keys[trial.trial_id], run_id, "failed")

    def _stop(self, trial: Any, step: int, value: float) -> None:
        """An early-stopped trial: its own status, the step, the validation that stopped it."""
        from mlflow.entities import RunTag

        run_id = self._runs.get(trial.trial_id) or self._start(trial)
        tags = {TAG_STATUS: "stopped", TAG_ASHA_STOP: str(int(step)),
                TAG_MESSAGE: f"ASHA stopped it at step {int(step)}: validation {value:.4g} was below its rung's cutoff"}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=MLFLOW_STATUS["stopped"])
        self._open.discard(trial.trial_id)
        self.tracker.remember(self._keys[trial.trial_id], run_id, "stopped")

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
