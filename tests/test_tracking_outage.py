"""A tracking server that goes away mid-sweep: trials go on, results are kept in the journal on the
sweep's storage, one warning line says so, and everything is logged once the server is back — by the
same invocation or, if the driver died meanwhile, by the next one. A real `mlflow server` is stopped
and restarted (SIGTERM to its process group), nothing about it is mocked."""
from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from mlflow_server import Server
from xfer.contract import TrialRecord
from xfer.tracking import finished_keys, load_runs
from xfer.tracking.writer import SweepTracker, TrackingCallback, _ACTIVE_PARENTS
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

pytestmark = pytest.mark.integration
PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once; the journal is what is tested
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()
    _ACTIVE_PARENTS.clear()


def trial(lr: float) -> TrialSpec:
    return TrialSpec(model=ModelSpec(name="m", arch="test_resnet", weights="random"), dataset=DatasetRef("digits"),
                     regime="finetune", hparams={"lr": lr, "wd": 0.0}, options={"steps": 4})


def final(val: float) -> dict:
    record = TrialRecord(status="finished", metric="top1", metrics={"val_top1": val}, steps_done=4)
    return {"xfer_final": True, "xfer_step": 4, "xfer_record": json.dumps(record.to_json())}


def ray_trial(t: TrialSpec, tid: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"trial": t.to_dict()}, error_file=None)


def test_results_survive_an_outage_and_a_dead_driver(server, tmp_path, caplog):
    journal_dir = tmp_path / "journal"
    tracker = SweepTracker(server.uri, "outage", journal_dir=journal_dir)
    tracker.start_parent({"total": 3})
    cb = TrackingCallback(tracker)
    a, b, c = trial(0.1), trial(0.01), trial(0.001)
    ra, rb, rc = ray_trial(a, "a"), ray_trial(b, "b"), ray_trial(c, "c")
    cb.on_trial_start(iteration=0, trials=[], trial=ra)
    cb.on_trial_result(iteration=0, trials=[], trial=ra, result=final(0.5))
    cb.on_trial_complete(iteration=0, trials=[], trial=ra)

    server.stop()
    with caplog.at_level(logging.WARNING, logger="xfer.tracking.writer"):
        for t, r, v in ((b, rb, 0.6), (c, rc, 0.7)):
            cb.on_trial_start(iteration=0, trials=[], trial=r)  # no server: no run, no exception
            cb.on_trial_result(iteration=0, trials=[], trial=r, result={"xfer_step": 2, "train_loss": 0.25})
            cb.on_trial_result(iteration=0, trials=[], trial=r, result=final(v))
            cb.on_trial_complete(iteration=0, trials=[], trial=r)
        assert cb.flush() == 2  # still away: both stay
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one line per outage, not one per call
    assert str(journal_dir) in warnings[0] and "Traceback" not in caplog.text
    assert sorted(p.stem for p in journal_dir.glob("*.json")) == sorted([b.key, c.key])

    # the driver dies here; the next invocation finds the journal once the server is back
    del cb, tracker
    server.start()
    again = SweepTracker(server.uri, "outage", journal_dir=journal_dir)
    again.start_parent({"total": 3})
    assert again.flush_journal() == 0 and not list(journal_dir.glob("*.json"))

    runs = load_runs(server.uri, "outage").set_index("trial_key")
    assert sorted(runs.index) == sorted([a.key, b.key, c.key])  # one run per key, none lost
    assert runs.loc[b.key, "val"] == pytest.approx(0.6) and (runs["status"] == "finished").all()
    assert finished_keys(server.uri, "outage") == {a.key, b.key, c.key}
    client = mlflow.MlflowClient(server.uri)
    hist = client.get_metric_history(runs.loc[b.key, "run_id"], "train_loss")
    assert [(m.step, m.value) for m in hist] == [(2, 0.25)]  # the step logged during the outage too


def test_sweep_goes_on_through_an_outage(server, tmp_path, monkeypatch, caplog):
    """A real sweep (local Ray, k-NN plugin trials of ~1 s): the server is stopped after the first grid
    results and restarted a little later; the sweep completes with one finished run per key."""
    import ray

    from xfer.spec import load_spec
    from xfer.sweep import run_sweep

    sys.path.insert(0, str(PLUGINS))
    monkeypatch.setattr(TrackingCallback, "RETRY_S", 2.0)
    spec_path = tmp_path / "outage.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "outage-sweep", "plugins": ["knn_regime"], "storage": str(tmp_path / "store"),
        "data_root": str(tmp_path),
        "models": [{"name": "m", "arch": "test_resnet", "weights": "random", "source_top1": 0.5}],
        "datasets": [{"name": "digits", "image_size": 8}],
        "regimes": {"knn": {"grid": {"neighbours": [1, 2, 3, 4, 5, 6, 7, 8]}, "max_train": 1200}},
        "resources": {"knn": {"cpu": 1}}}))
    journal = tmp_path / "store" / "journal" / "outage-sweep"
    seen = {"journaled": 0, "stopped": False}

    def chaos() -> None:
        client = mlflow.MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                exp = client.get_experiment_by_name("outage-sweep")
                done = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("xfer.status") == "finished"
                        and r.data.tags.get("xfer.stage") == "grid"] if exp else []
            except Exception:  # noqa: BLE001
                done = []
            if len(done) >= 2:
                break
            time.sleep(0.2)
        server.stop()
        seen["stopped"] = True
        t0 = time.monotonic()
        while time.monotonic() - t0 < 12:
            seen["journaled"] = max(seen["journaled"], len(list(journal.glob("*.json"))))
            time.sleep(0.2)
        server.start()

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS)}})
    watcher = threading.Thread(target=chaos, daemon=True)
    watcher.start()
    out = io.StringIO()
    try:
        with caplog.at_level(logging.WARNING, logger="xfer.tracking.writer"):
            result = run_sweep(load_spec(spec_path), tracking_uri=server.uri, report_dir=str(tmp_path / "report"),
                               stream=out, final_wait_s=120)
    finally:
        ray.shutdown()
        sys.path.remove(str(PLUGINS))
        watcher.join(timeout=60)
    assert seen["stopped"] and seen["journaled"] >= 1, (seen, out.getvalue())
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in out.getvalue()
    runs = load_runs(server.uri, "outage-sweep")
    grid = runs[runs["stage"] == "grid"]
    assert len(grid) == grid["trial_key"].nunique() == 8 and (grid["status"] == "finished").all()
    assert (runs[runs["stage"] == "final"]["status"] == "finished").sum() == 1
    assert not list(journal.glob("*.json")) and Path(result.report["files"]["report_html"]).is_file()
