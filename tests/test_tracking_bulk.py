"""Runs written in bulk (xfer.tracking.bulk) against runs written through MLflow's client: what a reader
sees must be the same — tags, params, metric history and latest values, status, times, search filters.
Real MLflow on a SQLite file."""
from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from xfer.tracking import bulk


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('bulk')}/mlflow.db")  # one database: migrations are slow


@pytest.fixture()
def client(store, request):
    return store, store.create_experiment(request.node.name)


def _run(i: int, status: str = "FINISHED") -> bulk.NewRun:
    return bulk.NewRun(run_name=f"trial {i}", status=status, tags={"xfer.trial_key": f"k{i}", "xfer.status": "finished"},
                       params={"l2": str(10.0 ** -i), "model": "m"},
                       metrics=[("val_top1", 0.5 + i / 100, 7), ("train_loss", 1.0, 3), ("train_loss", 0.25, 7),
                                ("nan_metric", math.nan, 7)],
                       start_ms=1_000 + i, end_ms=2_000 + i)


def _view(c: MlflowClient, run_id: str) -> dict:
    r = c.get_run(run_id)
    return {"name": r.info.run_name, "status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
            "stage": r.info.lifecycle_stage, "tags": {k: v for k, v in r.data.tags.items()},
            "params": r.data.params, "latest": {k: v for k, v in r.data.metrics.items() if k != "nan_metric"},
            "nan": math.isnan(r.data.metrics["nan_metric"]),
            "history": sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss")),
            "artifact_uri_tail": r.info.artifact_uri.rsplit("/", 2)[-2:]}


def test_bulk_runs_read_back_as_client_written_ones(client):
    c, exp = client
    [by_sql] = bulk.create_runs(c, exp, [_run(1)])
    by_client = bulk._one_by_client(c, exp, _run(1))
    a, b = _view(c, by_sql), _view(c, by_client)
    assert a["artifact_uri_tail"] == [by_sql, "artifacts"] and b["artifact_uri_tail"] == [by_client, "artifacts"]
    a.pop("artifact_uri_tail"), b.pop("artifact_uri_tail")
    assert a == b
    assert a["status"] == "FINISHED" and a["latest"] == {"val_top1": 0.51, "train_loss": 0.25}
    assert a["history"] == [(3, 1.0), (7, 0.25)] and a["nan"]
    assert a["tags"]["mlflow.runName"] == "trial 1"
    # search filters see bulk runs (the runs table and the rerun lookup go through search_runs)
    found = c.search_runs([exp], "tags.`xfer.trial_key` = 'k1' and metrics.val_top1 > 0.5")
    assert sorted(r.info.run_id for r in found) == sorted([by_sql, by_client])


def test_one_transaction_for_many_runs_in_order(client):
    c, exp = client
    ids = bulk.create_runs(c, exp, [_run(i) for i in range(50)])
    assert len(set(ids)) == 50
    assert [c.get_run(i).data.tags["xfer.trial_key"] for i in ids[:3]] == ["k0", "k1", "k2"]
    assert len(c.search_runs([exp], max_results=1000)) == 50
    with pytest.raises(Exception):  # a run of a closed experiment is refused, as by the client
        c.delete_experiment(exp)
        bulk.create_runs(c, exp, [_run(99)])


def test_a_bad_run_writes_nothing_of_its_batch(client, monkeypatch):
    c, exp = client
    with pytest.raises(Exception, match="(?i)status|RUNNINGX"):
        bulk.create_runs(c, exp, [_run(1), _run(2, status="RUNNINGX")])
    assert c.search_runs([exp]) == []
    # a failure inside the database (here: two runs with one id) rolls the whole batch back
    same = bulk.ordered_run_id()
    monkeypatch.setattr(bulk, "ordered_run_id", lambda: same)
    with pytest.raises(Exception, match="(?i)unique|integrity|constraint"):
        bulk.create_runs(c, exp, [_run(1), _run(2)])
    assert c.search_runs([exp]) == []


def test_other_stores_use_the_client_three_calls_a_run(client, monkeypatch):
    """An HTTP tracking server has no SQL session: the same runs through the client."""
    c, exp = client
    monkeypatch.setattr(bulk, "sql_store", lambda _client: None)
    calls = []
    for name in ("create_run", "log_batch", "set_terminated"):
        real = getattr(c, name)
        monkeypatch.setattr(c, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    ids = bulk.create_runs(c, exp, [_run(1), _run(2)])
    assert calls == ["create_run", "log_batch", "set_terminated"] * 2
    assert [c.get_run(i).info.status for i in ids] == ["FINISHED", "FINISHED"]


def test_run_ids_are_time_ordered_uuid7_and_unique(client, monkeypatch):
    """Ordered ids keep MLflow's run_uuid-keyed B-trees appending (flat cost per run as an experiment grows):
    they must increase even within one millisecond or when the clock steps back, look like UUIDv7, and be
    accepted by MLflow as run ids."""
    import uuid

    ids = [bulk.ordered_run_id() for _ in range(5000)]  # far more than one per millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    u = uuid.UUID(hex=ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122 and len(ids[0]) == 32
    monkeypatch.setattr(bulk.time, "time_ns", lambda: 1_000_000)  # a clock far in the past
    later = bulk.ordered_run_id()
    assert later > ids[-1]
    c, exp = client
    made = bulk.create_runs(c, exp, [_run(1), _run(2)])
    assert made == sorted(made)
    assert [c.get_run(r).info.run_id for r in made] == made
