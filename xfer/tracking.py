"""MLflow tracking: one experiment per sweep, a parent run per invocation, a child run per trial.

The schema (DESIGN §6): child runs carry the tags ``mlflow.parentRunId``, ``xfer.trial_key``,
``xfer.model``, ``xfer.dataset``, ``xfer.regime``, ``xfer.stage``, ``xfer.status`` and every
hyper-parameter / option of the trial as params. A trial key names exactly one run in its
experiment, whatever invocation created it: reruns and ``Tuner.restore`` look the run up by key and
log into it again (a failed trial is retried into the same run), so the experiment never holds two
runs for one key.

Only the Ray driver writes (``TrackingCallback``): SQLite does not survive concurrent writers, and a
trainable stays free of MLflow. Everything goes through ``MlflowClient`` with explicit run ids; the
fluent ``mlflow.start_run`` global state is never touched, so several sweeps/tests in one process
cannot log into each other's runs.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlparse

import numpy as np

from ray.tune import Callback

if TYPE_CHECKING:
    import ssl

    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

TAG_PARENT = "mlflow.parentRunId"
TAG_KEY = "xfer.trial_key"
TAG_KIND = "xfer.kind"
TAG_SWEEP = "xfer.sweep"
TAG_STATUS = "xfer.status"
TAG_MESSAGE = "xfer.message"
TAG_METRIC = "xfer.metric"
TAG_ATTEMPT = "xfer.attempt"

RUNS_COLUMNS = ["run_id", "trial_key", "model", "dataset", "regime", "stage", "status", "metric", "val", "test",
                "source_top1", "lr", "wd", "l2", "seed", "start_time"]
RESULT_STATUSES = ("finished", "diverged")  # a diverged trial is a result; failed ones are retried
# xfer status -> MLflow run status (a diverged trial ran to a conclusion, so its run FINISHED)
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
PROVENANCE_PACKAGES = ("xfer", "torch", "torchvision", "timm", "ray", "mlflow")
# keys of a trial's final result that are bookkeeping, not metrics
_FINAL_FIELDS = {"xfer_step", "xfer_final", "xfer_objective", "status", "message", "metric", "artifacts",
                 "fingerprints"}

_MAX_PARAM_LEN = 6000  # MLflow's limits (mlflow.utils.validation)
_MAX_TAG_LEN = 8000
_BATCH = 100  # params/tags per log_batch call
_PAGE = 1000  # runs per search page

# (uri, experiment) -> parent run id of the invocation running in this process. A restored Tuner
# unpickles the callbacks it was created with (they carry the *old* parent run); they log under the
# parent of the current invocation instead.
_ACTIVE_PARENTS: dict[tuple[str, str], str] = {}


class TrackingError(RuntimeError):
    """A tracking problem the user can fix (unreachable server, missing experiment, bad URI)."""


# ---------------------------------------------------------------------------------------------
# Where to track
# ---------------------------------------------------------------------------------------------

def resolve_tracking_uri(cli_value: str | None, spec_value: str | None) -> str:
    """CLI flag > $MLFLOW_TRACKING_URI > the spec's ``tracking_uri`` > ``sqlite:///mlflow.db`` (in the
    working directory). The file store (``./mlruns``) is not a default: recent MLflow refuses it."""
    for value in (cli_value, os.environ.get(ENV_TRACKING_URI), spec_value):
        if value is not None and str(value).strip():
            return str(value).strip()
    return DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 10) -> None:
    """Fail fast with a clear message instead of MLflow's retry loop (7 retries with exponential
    backoff and a 120 s request timeout by default, i.e. minutes before the first error).

    http(s): GET ``<uri>/health`` (the endpoint ``mlflow server`` provides) with ``timeout_s``; only
    a refused/timed-out connection is an error (any HTTP answer means a server is there — a proxy or
    an auth layer may answer /health with 401/404). sqlite: the database's folder must exist. file
    store: refused by recent MLflow, so say what to use instead.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s, context=_tls_context()) as resp:  # noqa: S310
                resp.read(64)
        except urllib.error.HTTPError as e:
            log.warning("MLflow tracking server at %s answered /health with HTTP %s; carrying on", uri, e.code)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri}: {reason}; start it (e.g. `mlflow server "
                f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`) or pass --tracking-uri "
                f"(e.g. --tracking-uri {DEFAULT_TRACKING_URI} for a local file)") from None
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None and not db.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: the folder {db.parent} does not exist; create it or pass "
                                f"--tracking-uri {DEFAULT_TRACKING_URI}")
    elif scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(f"tracking URI {uri!r} is an MLflow file store, which recent MLflow refuses; use a "
                            f"database such as {DEFAULT_TRACKING_URI} (migrate old runs with `mlflow "
                            "migrate-filestore`) or an http(s):// tracking server")


def _tls_context() -> "ssl.SSLContext":
    """Honour the TLS settings the MLflow client itself reads, so the check agrees with MLflow."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (``sqlite:///rel.db``, ``sqlite:////abs.db``); None in memory."""
    rest = uri[len("sqlite://"):]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:].split("?")[0])


def _client(uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: "MlflowClient", name: str) -> str | None:
    exp = client.get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def _require_experiment(client: "MlflowClient", uri: str, name: str) -> str:
    exp_id = _experiment_id(client, name)
    if exp_id is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment named {name!r} at {uri} (one experiment per sweep name); "
                            f"experiments there: {', '.join(names) or '(none)'}")
    return exp_id


def _default_artifact_location(uri: str, experiment_name: str) -> str | None:
    """Artifacts of a SQLite-tracked sweep live next to the database (not in whatever directory the
    sweep happened to start from); servers decide for themselves (proxied artifacts)."""
    if not uri.startswith("sqlite:"):
        return None
    db = _sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).strip("_") or "experiment"
    return (db.resolve().parent / "mlartifacts" / slug).as_uri()


# ---------------------------------------------------------------------------------------------
# Run lookup (shared by the tracker, the callback and the readers)
# ---------------------------------------------------------------------------------------------

def _iter_trial_runs(client: "MlflowClient", experiment_id: str, extra_filter: str = "") -> Iterator["Run"]:
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


_STATUS_RANK = {"finished": 0, "diverged": 1, "failed": 2, "running": 3}


def _pick(runs: list["Run"]) -> "Run":
    """The run that stands for a key when an older tool left several: a result beats a retry, then
    the newest."""
    return sorted(runs, key=lambda r: (_STATUS_RANK.get(r.data.tags.get(TAG_STATUS, ""), 4),
                                       -(r.info.start_time or 0)))[0]


def _runs_by_key(runs: Iterable["Run"]) -> dict[str, "Run"]:
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


# ---------------------------------------------------------------------------------------------
# What a run records
# ---------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly: float(param) == the grid value
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def trial_params(trial: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Flat MLflow params for a ``TrialSpec.to_dict()``: grid axes and regime options by their own
    names (lr, wd, l2, steps, batch_size, ...), then seed/stage/regime, the model's fields, the
    dataset and its options, the pretrain block, and fingerprints found in the Ray config."""
    out: dict[str, Any] = {}
    out.update(trial.get("hparams") or {})
    for k, v in (trial.get("options") or {}).items():
        out[k if k not in out else f"option.{k}"] = v
    out.update({"seed": trial.get("seed", 0), "stage": trial.get("stage", "grid"), "regime": trial["regime"]})
    model = dict(trial["model"])
    pretrain = model.pop("pretrain", None)
    out["model"] = model.pop("name")
    for k, v in model.items():
        out[k] = v
    ds = trial["dataset"]
    out["dataset"] = ds["name"]
    if ds.get("label"):
        out["dataset_label"] = ds["label"]
    for k, v in (ds.get("options") or {}).items():
        out[f"dataset.{k}"] = v
    if pretrain:
        pds = pretrain.get("dataset") or {}
        out["pretrain.dataset"] = pds.get("label") or pds.get("name")
        for k, v in (pds.get("options") or {}).items():
            out[f"pretrain.dataset.{k}"] = v
        out["pretrain.seed"] = pretrain.get("seed", 0)
        for k, v in (pretrain.get("options") or {}).items():
            out[f"pretrain.{k}"] = v
    config = config or {}
    for k, v in config.items():
        if k.endswith("_fingerprint") and v is not None:
            out[k] = v
    for k, v in (config.get("fingerprints") or {}).items():
        out[f"{k}_fingerprint"] = v
    return {_safe_key(k): _fmt(v)[:_MAX_PARAM_LEN] for k, v in out.items() if v is not None}


def run_name(trial: Mapping[str, Any]) -> str:
    """``model/dataset/regime lr=0.01 wd=1e-05`` (+ seed and stage when they are not the defaults)."""
    ds = trial["dataset"]
    name = f"{trial['model']['name']}/{ds.get('label') or ds['name']}/{trial['regime']}"
    hp = " ".join(f"{k}={v:.3g}" if isinstance(v, (int, float)) else f"{k}={v}"
                  for k, v in (trial.get("hparams") or {}).items())
    if hp:
        name += " " + hp
    if trial.get("seed", 0):
        name += f" seed={trial['seed']}"
    if trial.get("stage", "grid") != "grid":
        name += f" [{trial['stage']}]"
    return name


def default_trial_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A trial's ``TrialSpec.to_dict()`` from its Ray config (the sweep's contract: ``{"trial": ...}``,
    with any values a searcher sampled at the top level merged in — see ``TrialSpec.from_config``)."""
    if "trial" not in config:
        raise TrackingError(f"the Ray trial config has no 'trial' entry (keys: {', '.join(config)}); the sweep "
                            "must pass {'trial': TrialSpec.to_dict()} or give TrackingCallback a trial_of")
    from xfer.spec import TrialSpec

    return TrialSpec.from_config(config).to_dict()


def trial_key(config: Mapping[str, Any], trial: Mapping[str, Any] | None = None) -> str:
    """The trial's key: ``config["trial_key"]`` when the sweep put it there, else computed."""
    if config.get("trial_key"):
        return str(config["trial_key"])
    from xfer.spec import TrialSpec

    return TrialSpec.from_dict(trial if trial is not None else default_trial_of(config)).key


@functools.lru_cache(maxsize=4)
def _provenance(cwd: str) -> tuple[tuple[str, str], ...]:
    return tuple(_provenance_tags(cwd).items())


def provenance_tags() -> dict[str, str]:
    """Git commit of the working directory (if it is a checkout), package and python versions
    (computed once per working directory: thousands of trial starts must not each run git)."""
    return dict(_provenance(os.getcwd()))


def _provenance_tags(cwd: str) -> dict[str, str]:
    tags: dict[str, str] = {"xfer.python": platform.python_version()}
    for pkg in PROVENANCE_PACKAGES:
        try:
            tags[f"xfer.version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            if pkg == "xfer":
                import xfer

                tags["xfer.version.xfer"] = xfer.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            tags["xfer.git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=cwd)
            if dirty.returncode == 0:
                tags["xfer.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout: nothing to record
    return tags


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _safe_key(k: str) -> str:
    """An MLflow param/metric name: slashes, word characters, periods, dashes and spaces only (a
    dataset label in a plan summary may hold anything), at most 250 characters."""
    k = re.sub(r"[^\w.\- /]", "_", str(k))
    k = re.sub(r"/+", "/", k).strip("/ ")
    return k[:250] or "_"


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v)


def _chunks(items: list, n: int = _BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ---------------------------------------------------------------------------------------------
# The sweep's experiment and parent run
# ---------------------------------------------------------------------------------------------

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
            self._client_obj = _client(self.uri)
        return self._client_obj

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp_id = _experiment_id(self.client, self.experiment_name)
            if exp_id is None:
                exp_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=_default_artifact_location(self.uri, self.experiment_name),
                    tags={TAG_SWEEP: self.experiment_name})
                log.info("created MLflow experiment %r (%s) at %s", self.experiment_name, exp_id, self.uri)
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

        flat = {k: v for k, v in _flatten(spec_summary).items() if v is not None and k != "path"}
        params = list({_safe_key(k): Param(_safe_key(k), _fmt(v)[:_MAX_PARAM_LEN]) for k, v in flat.items()}.values())
        for chunk in _chunks(params):
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
            runs = _runs_by_key(_iter_trial_runs(self.client, self.experiment_id))
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


# ---------------------------------------------------------------------------------------------
# The Ray Tune callback (driver side; the only MLflow writer)
# ---------------------------------------------------------------------------------------------

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
    invocation. on_trial_result: numeric metrics at ``step=result["xfer_step"]``; the result with
    ``xfer_final`` also sets status/message, logs ``result["artifacts"]`` and closes the run.
    on_trial_error / a completion without a final result: ``xfer.status=failed``.
    """

    def __init__(self, tracker: SweepTracker,
                 trial_of: Callable[[Mapping[str, Any]], Mapping[str, Any]] = default_trial_of) -> None:
        """``trial_of`` maps a Ray config to the trial's ``TrialSpec.to_dict()`` (the default reads
        ``config["trial"]``; a searcher that samples hyper-parameters into the config needs its own,
        a module-level function so that the callback stays picklable)."""
        self.tracker = tracker
        self.trial_of = trial_of
        self._runs: dict[str, str] = {}  # Ray trial_id -> MLflow run_id
        self._keys: dict[str, str] = {}  # Ray trial_id -> trial key
        self._steps: dict[str, int] = {}  # last step logged per trial
        # trial ids started by this process whose run is still open (not persisted: after a restore,
        # trials that finished before must never be touched again)
        self._open: set[str] = set()
        self._skip = _ray_bookkeeping_keys() | _FINAL_FIELDS

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
        step = result.get("xfer_step")
        if step is None:
            step = result.get("steps_done", result.get("training_iteration", self._steps.get(trial.trial_id, 0)))
        step = int(step)
        self._steps[trial.trial_id] = step
        self._log_metrics(run_id, result, step)
        if result.get("xfer_final"):
            self._finish(trial, run_id, result)

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
            self.client.set_tag(run_id, "xfer.error_after_result", _last_line(text)[:_MAX_TAG_LEN])
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

        spec = self.trial_of(trial.config)
        key = self._keys.get(trial.trial_id) or trial_key(trial.config, spec)
        self._keys[trial.trial_id] = key
        parent = self.tracker.parent_run_id
        tags = {TAG_KEY: key, TAG_KIND: "trial", TAG_SWEEP: self.tracker.experiment_name,
                "xfer.model": spec["model"]["name"],
                "xfer.dataset": spec["dataset"].get("label") or spec["dataset"]["name"],
                "xfer.regime": spec["regime"], "xfer.stage": spec.get("stage", "grid"), TAG_STATUS: "running",
                "xfer.ray_trial_id": trial.trial_id, **provenance_tags()}
        if parent:
            tags[TAG_PARENT] = parent
        params = trial_params(spec, trial.config)

        known = self._runs.get(trial.trial_id)
        found = self.tracker.lookup(key)
        run_id = known or (found[0] if found else None)
        if run_id is None:
            run = self.client.create_run(self.tracker.experiment_id, run_name=run_name(spec),
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
        for chunk in _chunks([RunTag(k, str(v)[:_MAX_TAG_LEN]) for k, v in tags.items()]):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in _chunks([Param(k, v) for k, v in new_params.items()]):
            self.client.log_batch(run_id, params=chunk)
        self._runs[trial.trial_id] = run_id
        self._open.add(trial.trial_id)
        self.tracker.remember(key, run_id, "running")
        return run_id

    def _log_metrics(self, run_id: str, result: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for k, v in result.items():
            if k in self._skip or k.startswith("_"):
                continue
            x = _numeric(v)
            if x is not None:
                metrics.append(Metric(_safe_key(k), x, now, step))
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def _finish(self, trial: Any, run_id: str, result: Mapping[str, Any]) -> None:
        status = str(result.get("status") or "failed")
        if status not in MLFLOW_STATUS or status == "killed":
            log.warning("trial %s reported unknown status %r; recording failed", self._keys[trial.trial_id], status)
            status = "failed"
        tags = {TAG_STATUS: status, TAG_MESSAGE: str(result.get("message") or "")[:_MAX_TAG_LEN]}
        if result.get("metric"):
            tags[TAG_METRIC] = str(result["metric"])
        for name, fp in (result.get("fingerprints") or {}).items():
            tags[f"xfer.fingerprint.{name}"] = str(fp)
        artifacts = result.get("artifacts") or {}
        for name, path in artifacts.items():
            tags[f"xfer.artifact.{name}"] = str(path)[:_MAX_TAG_LEN]
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        for name, path in artifacts.items():
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p))
            else:
                # e.g. a worker-local path on a cluster without shared storage: the tag keeps the path
                log.warning("trial %s: artifact %s at %s is not visible from the driver; not logged",
                            self._keys[trial.trial_id], name, path)
        self._close(trial, run_id, status)

    def _fail(self, trial: Any, run_id: str, message: str) -> None:
        self.client.set_tag(run_id, TAG_STATUS, "failed")
        self.client.set_tag(run_id, TAG_MESSAGE, message[:_MAX_TAG_LEN])
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


# ---------------------------------------------------------------------------------------------
# Readers: the runs table, predictions, finished keys; report files onto the parent run
# ---------------------------------------------------------------------------------------------

def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _metric_name(run: "Run") -> str:
    """The dataset's metric: the tag the final result set, else the val_/test_ metric the run has."""
    name = run.data.tags.get(TAG_METRIC)
    if name:
        return name
    for prefix in ("val_", "test_"):
        for k in sorted(run.data.metrics):
            if k.startswith(prefix) and k != f"{prefix}loss":
                return k[len(prefix):]
    return ""


def _row(run: "Run") -> dict[str, Any]:
    import pandas as pd

    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    metric = _metric_name(run)
    source = metrics.get("source_top1", params.get("source_top1"))
    seed = params.get("seed")
    return {
        "run_id": run.info.run_id, "trial_key": tags.get(TAG_KEY), "model": tags.get("xfer.model"),
        "dataset": tags.get("xfer.dataset"), "regime": tags.get("xfer.regime"), "stage": tags.get("xfer.stage"),
        "status": tags.get(TAG_STATUS, "running"), "metric": metric,
        "val": _to_float(metrics.get(f"val_{metric}")) if metric else math.nan,
        "test": _to_float(metrics.get(f"test_{metric}")) if metric else math.nan,
        "source_top1": _to_float(source), "lr": _to_float(params.get("lr")), "wd": _to_float(params.get("wd")),
        "l2": _to_float(params.get("l2")), "seed": None if seed is None else int(float(seed)),
        "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC") if run.info.start_time else pd.NaT,
    }


def load_runs(uri: str, experiment: str) -> "pd.DataFrame":
    """The runs table (one row per child run; parent runs excluded), columns ``RUNS_COLUMNS``.

    ``status`` is finished | diverged | failed, or running for a trial in progress / interrupted.
    ``stage`` is grid | final (| pretrain for source-training runs). Numeric params are floats
    (NaN where the regime has no such axis); ``source_top1`` comes from the run's metric, else the
    model's ``source_top1`` param.
    """
    import pandas as pd

    client = _client(uri)
    exp_id = _require_experiment(client, uri, experiment)
    rows = [_row(r) for r in _iter_trial_runs(client, exp_id)]
    df = pd.DataFrame(rows, columns=RUNS_COLUMNS)
    for c in ("val", "test", "source_top1", "lr", "wd", "l2"):
        df[c] = df[c].astype(float)
    df["seed"] = df["seed"].astype("Int64")
    df["start_time"] = pd.to_datetime(df["start_time"], utc=True)
    return df.sort_values(["model", "dataset", "regime", "stage", "start_time"], kind="stable").reset_index(drop=True)


def finished_keys(uri: str, experiment: str, stage: str = "grid") -> set[str]:
    """Keys of ``stage`` trials that have a result (finished or diverged): a rerun skips them; failed
    ones run again, into the same MLflow run. No experiment yet → nothing finished."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    if exp_id is None:
        return set()
    runs = _runs_by_key(_iter_trial_runs(client, exp_id, f"tags.`xfer.stage` = '{stage}'"))
    return {k for k, r in runs.items() if r.data.tags.get(TAG_STATUS) in RESULT_STATUSES}


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


def parent_runs(uri: str, experiment: str) -> "pd.DataFrame":
    """The sweep invocations (parent runs) of an experiment, newest first: run_id, run_name, status,
    start_time (``xfer report`` attaches its files to the newest)."""
    import pandas as pd

    client = _client(uri)
    exp_id = _require_experiment(client, uri, experiment)
    rows, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KIND}` = 'sweep'", max_results=_PAGE,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        rows += [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
                  "start_time": pd.Timestamp(r.info.start_time, unit="ms", tz="UTC")} for r in page]
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=["run_id", "run_name", "status", "start_time"])
