"""The run schema: what an MLflow run of xfer records, and how a run reads back into a table row.

One experiment per sweep; a parent run per invocation (``xfer.kind=sweep``); a child run per trial
key tagged ``mlflow.parentRunId``, ``xfer.trial_key``, ``xfer.model``, ``xfer.dataset``, ``xfer.regime``,
``xfer.stage``, ``xfer.status`` (running | finished | diverged | failed | stopped: ASHA ended it early,
``xfer.asha_stopped_step`` says where — the tag stays when an audit later runs it to the end), ``xfer.metric``, the
fingerprints of data and weights (``xfer.fingerprint.*``) and provenance (git commit, package
versions). Params: the trial's grid axes by their own names (whatever axes its regime declares),
its options, the model, dataset and pretrain fields. Metrics: per-step ``train_loss`` / ``val_*``,
final ``val_*`` (grid) or ``test_*`` (final), ``source_top1``, ``trial_seconds``.

A trial whose key several model entries share (a regime whose identity ignores the weights) is one
run; ``xfer.models`` lists each model with its source accuracy and the runs table has a row per model.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from xfer.regimes import REGIMES, all_axis_names

if TYPE_CHECKING:
    from mlflow.entities import Run

    from xfer.trial import TrialSpec

TAG_PARENT = "mlflow.parentRunId"
TAG_KEY = "xfer.trial_key"
TAG_KIND = "xfer.kind"
TAG_SWEEP = "xfer.sweep"
TAG_STATUS = "xfer.status"
TAG_MESSAGE = "xfer.message"
TAG_METRIC = "xfer.metric"
TAG_ATTEMPT = "xfer.attempt"
TAG_MODELS = "xfer.models"
TAG_FINGERPRINT = "xfer.fingerprint."
TAG_ASHA_STOP = "xfer.asha_stopped_step"  # the step ASHA stopped a grid trial at (kept if an audit finishes it)

# xfer status -> MLflow run status (a diverged trial ran to a conclusion, so its run FINISHED; one ASHA
# stopped did not, so the UI shows it KILLED, never as a finished trial)
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "killed": "KILLED",
                 "stopped": "KILLED"}
PROVENANCE_PACKAGES = ("xfer", "torch", "torchvision", "timm", "ray", "mlflow")
BASE_COLUMNS = ["run_id", "trial_key", "model", "dataset", "regime", "stage", "status", "metric", "val", "test",
                "source_top1", "solver_converged", "seed", "seconds", "start_time"]

MAX_PARAM_LEN = 6000  # MLflow's limits (mlflow.utils.validation)
MAX_TAG_LEN = 8000
BATCH = 100  # params/tags per log_batch call


def runs_columns() -> list[str]:
    return BASE_COLUMNS[:-1] + all_axis_names() + BASE_COLUMNS[-1:]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly: float(param) == the grid value
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def trial_params(trial: "TrialSpec") -> dict[str, str]:
    """Flat MLflow params of a trial: grid axes and regime options by their own names, then
    seed/stage/regime, the model's fields, the dataset and its options, the pretrain block."""
    regime = REGIMES.get(trial.regime) if trial.regime in REGIMES else None
    out: dict[str, Any] = {k: regime.axis(k).param(v) if regime and k in regime.axis_names else v
                           for k, v in trial.hparams.items()}  # a named axis (pooling) by its name
    for k, v in trial.options.items():
        out[k if k not in out else f"option.{k}"] = v
    out.update({"seed": trial.seed, "stage": trial.stage, "regime": trial.regime})
    model = trial.model.to_dict()
    pretrain = model.pop("pretrain", None)
    out["model"] = model.pop("name")
    out.update(model)
    out["dataset"] = trial.dataset.name
    if trial.dataset.label:
        out["dataset_label"] = trial.dataset.label
    for k, v in trial.dataset.options.items():
        out[f"dataset.{k}"] = v
    if pretrain:
        pds = pretrain.get("dataset") or {}
        out["pretrain.dataset"] = pds.get("label") or pds.get("name")
        for k, v in (pds.get("options") or {}).items():
            out[f"pretrain.dataset.{k}"] = v
        out["pretrain.seed"] = pretrain.get("seed", 0)
        for k, v in (pretrain.get("options") or {}).items():
            out[f"pretrain.{k}"] = v
    return {safe_key(k): _fmt(v)[:MAX_PARAM_LEN] for k, v in out.items() if v is not None}


def run_name(trial: "TrialSpec") -> str:
    """``model/dataset/regime lr=0.01 wd=1e-05`` (+ seed and stage when they are not the defaults)."""
    name = f"{trial.model.name}/{trial.dataset.display}/{trial.regime}"
    hp = REGIMES.get(trial.regime).describe(trial.hparams) if trial.regime in REGIMES else ""
    if hp:
        name += " " + hp
    if trial.seed:
        name += f" seed={trial.seed}"
    if trial.stage != "grid":
        name += f" [{trial.stage}]"
    return name


def trial_tags(trial: "TrialSpec", key: str) -> dict[str, str]:
    return {TAG_KEY: key, TAG_KIND: "trial", "xfer.model": trial.model.name, "xfer.dataset": trial.dataset.display,
            "xfer.regime": trial.regime, "xfer.stage": trial.stage}


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


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def safe_key(k: str) -> str:
    """An MLflow param/metric name: slashes, word characters, periods, dashes and spaces only (a
    dataset label in a plan summary may hold anything), at most 250 characters."""
    k = re.sub(r"[^\w.\- /]", "_", str(k))
    k = re.sub(r"/+", "/", k).strip("/ ")
    return k[:250] or "_"


def numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v)


def chunks(items: list, n: int = BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]




# ---------------------------------------------------------------------------------------------
# Reading a run back
# ---------------------------------------------------------------------------------------------
def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _axis_value(regime: str | None, axis: str, raw: Any) -> float:
    """A recorded grid-axis param as the runs table's number (a named axis's name → its index)."""
    if regime in REGIMES and axis in REGIMES.get(regime).axis_names:
        return REGIMES.get(regime).axis(axis).parse(raw)
    return _to_float(raw)


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


def rows(run: "Run") -> list[dict[str, Any]]:
    """The runs-table rows of one run: one, or one per model for a run several models share."""
    import pandas as pd

    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    metric = _metric_name(run)
    seed = params.get("seed")
    row = {
        "run_id": run.info.run_id, "trial_key": tags.get(TAG_KEY), "model": tags.get("xfer.model"),
        "dataset": tags.get("xfer.dataset"), "regime": tags.get("xfer.regime"), "stage": tags.get("xfer.stage"),
        "status": tags.get(TAG_STATUS, "running"), "metric": metric,
        "val": _to_float(metrics.get(f"val_{metric}")) if metric else math.nan,
        "test": _to_float(metrics.get(f"test_{metric}")) if metric else math.nan,
        "source_top1": _to_float(metrics.get("source_top1", params.get("source_top1"))),
        "solver_converged": _to_float(metrics.get("solver_converged")),  # 1/0 from an iterative fit, else NaN
        "seed": None if seed is None else int(float(seed)), "seconds": _to_float(metrics.get("trial_seconds")),
        "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC") if run.info.start_time else pd.NaT,
        **{a: _axis_value(tags.get("xfer.regime"), a, params.get(a)) for a in all_axis_names()},
    }
    shared = tags.get(TAG_MODELS)
    if not shared:
        return [row]
    return [{**row, "model": name, "source_top1": _to_float(top1)} for name, top1 in json.loads(shared).items()]
