"""Finished trial runs written in bulk: what keeps tracking cheaper than a short trial.

MLflow's client writes a run in several round trips (create, tags, params, metrics, terminate), each its
own database transaction — on a SQLite store about 0.3 s a run, serially on the Ray driver, longer than a
probe trial's compute. A batch of finished trials (e.g. the 45 runs of one λ path) is written here:

* on a **SQL store** (``sqlite:`` / ``postgresql:`` / ``mysql:`` URIs): the rows MLflow's own store writes
  for ``create_run`` + ``log_batch`` + ``set_terminated`` — run, tags, params, metric history and latest
  metrics — inserted through its own table models in **one transaction per batch**; all-or-nothing, so a
  failure leaves nothing half-written and the caller's journal still holds every result;
* on any other store (an ``http(s)://`` tracking server): three calls a run — ``create_run`` with every
  tag, one ``log_batch`` with params and metrics, ``set_terminated``.

No step looks anything up in the experiment (the caller knows which keys are new), and run ids are
**time-ordered** (``ordered_run_id``: UUIDv7-shaped, the creation time first): MLflow's tables key their
rows by ``run_uuid`` (params, tags, latest metrics: by (key, run_uuid)), so random ids put every new row at
a random place in B-trees that grow with the experiment — more pages touched and written per batch as it
grows — while ordered ids append at the end. That keeps the cost of a run nearly flat with the number of
runs already there (``benchmarks/tracking_cost.py``). Runs read back exactly as client-written ones
(``tests/test_tracking_bulk.py``).
"""
from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

MLFLOW_RUN_NAME = "mlflow.runName"

_ID_LOCK = threading.Lock()
_last_id = [0, 0]  # (milliseconds, sequence) of the last id made in this process


def ordered_run_id() -> str:
    """A 32-hex-digit run id laid out as a UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version 7,
    a 12-bit sequence (ids made within one millisecond still increase), the variant, 62 random bits.
    Ids of one process strictly increase; ids of several writers interleave by time — unique either way
    (the random bits), and as valid a run id as MLflow's own uuid4 hex."""
    with _ID_LOCK:
        ms, seq = time.time_ns() // 1_000_000, 0
        if ms <= _last_id[0]:  # same millisecond (or the clock stepped back): keep increasing
            ms, seq = _last_id[0], _last_id[1] + 1
            if seq >= 1 << 12:
                ms, seq = ms + 1, 0
        _last_id[:] = [ms, seq]
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | secrets.randbits(62)
    return uuid.UUID(int=value).hex


@dataclass
class NewRun:
    """One finished run to create: everything is known up front (a trial that already ended)."""

    run_name: str
    status: str  # MLflow's: FINISHED | FAILED | KILLED
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)  # (key, value, step)
    start_ms: int | None = None
    end_ms: int | None = None


def sql_store(client: "MlflowClient") -> Any | None:
    """The client's store when it is MLflow's SQLAlchemy store (where one transaction can hold many
    runs), else None."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store
    return store if isinstance(store, SqlAlchemyStore) else None


def create_runs(client: "MlflowClient", experiment_id: str, runs: list[NewRun]) -> list[str]:
    """Create every run of ``runs`` as finished; returns their run ids, in order."""
    if not runs:
        return []
    store = sql_store(client)
    if store is None:
        return [_one_by_client(client, experiment_id, r) for r in runs]
    return _in_one_transaction(store, experiment_id, runs)


def _one_by_client(client: "MlflowClient", experiment_id: str, r: NewRun) -> str:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    run = client.create_run(experiment_id, run_name=r.run_name, tags=dict(r.tags), start_time=r.start_ms or now)
    run_id = run.info.run_id
    metrics = [Metric(k, v, r.end_ms or now, step) for k, v, step in r.metrics]
    params = [Param(k, v) for k, v in r.params.items()]
    for i in range(0, max(len(metrics), len(params)), 100):  # the server's per-request limits
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
    client.set_terminated(run_id, status=r.status, end_time=r.end_ms or now)
    return run_id


def _in_one_transaction(store: Any, experiment_id: str, runs: list[NewRun]) -> list[str]:
    import sqlalchemy as sa
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.utils.uri import append_to_uri_path

    experiment = store.get_experiment(experiment_id)
    store._check_experiment_is_active(experiment)
    now = int(time.time() * 1000)
    ids: list[str] = []
    table: dict[Any, list[dict[str, Any]]] = {SqlRun: [], SqlTag: [], SqlParam: [], SqlMetric: [], SqlLatestMetric: []}
    for r in runs:
        RunStatus.from_string(r.status)  # a bad status fails before anything is written
        run_id = ordered_run_id()
        ids.append(run_id)
        end = r.end_ms or now
        table[SqlRun].append(dict(
            name=r.run_name, run_uuid=run_id, experiment_id=int(experiment_id),
            artifact_uri=append_to_uri_path(experiment.artifact_location, run_id, store.ARTIFACTS_FOLDER_NAME),
            source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="", entry_point_name="",
            user_id=r.tags.get("mlflow.user", "unknown"), status=r.status, start_time=r.start_ms or now,
            end_time=end, deleted_time=None, source_version="", lifecycle_stage=LifecycleStage.ACTIVE))
        tags = {MLFLOW_RUN_NAME: r.run_name, **r.tags}
        table[SqlTag] += [dict(run_uuid=run_id, key=k, value=v) for k, v in tags.items()]
        table[SqlParam] += [dict(run_uuid=run_id, key=k, value=v) for k, v in r.params.items()]
        latest: dict[str, tuple[int, float, bool]] = {}
        seen = set()
        for k, v, step in r.metrics:
            is_nan = math.isnan(v)
            value = 0.0 if is_nan else v  # MLflow stores NaN as 0 with is_nan (and ±inf as ±max float)
            if math.isinf(value):
                value = math.copysign(1.7976931348623157e308, value)
            if (k, step, value, is_nan) in seen:
                continue
            seen.add((k, step, value, is_nan))
            table[SqlMetric].append(dict(run_uuid=run_id, key=k, value=value, timestamp=end, step=step, is_nan=is_nan))
            if k not in latest or (step, value) > latest[k][:2]:
                latest[k] = (step, value, is_nan)
        table[SqlLatestMetric] += [dict(run_uuid=run_id, key=k, value=v, timestamp=end, step=st, is_nan=nan)
                                   for k, (st, v, nan) in latest.items()]
    # one transaction, one multi-row INSERT per table (runs first: the others reference them)
    with store.ManagedSessionMaker(read_only=False) as session:  # commits on exit, rolls back on error
        for model, rows in table.items():
            if rows:
                session.execute(sa.insert(model.__table__), rows)
    return ids
