"""xfer.tracking against real MLflow (a temp SQLite file, and a real `mlflow server`) and a real
Ray Tune run on a one-CPU local Ray."""
from __future__ import annotations

import math
import json
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from xfer import tracking
from xfer.trial import DatasetRef, ModelSpec, TrialSpec
from xfer.contract import TrialRecord
from xfer.tracking import TrackingError, schema, writer
from xfer.tracking.writer import SweepTracker, TrackingCallback


def make_trial(lr: float = 0.1, wd: float = 1e-4, *, regime: str = "finetune", stage: str = "grid", model: str = "m1",
               dataset: str = "digits", label: str | None = None, seed: int = 0) -> TrialSpec:
    hparams = {"l2": lr} if regime == "linear_probe" else {"lr": lr, "wd": wd}
    return TrialSpec(model=ModelSpec(name=model, arch="test_resnet", weights="random", source_top1=0.5),
                     dataset=DatasetRef(dataset, {"n_per_class": 3}, label=label), regime=regime,
                     hparams=hparams, options={"steps": 4, "batch_size": 8}, seed=seed, stage=stage)


def fake_trial(t: TrialSpec, trial_id: str, error_file: str | None = None) -> SimpleNamespace:
    """What the callback reads off a Ray Trial (the real object is exercised in the Ray test)."""
    return SimpleNamespace(trial_id=trial_id, config={"trial": t.to_dict()}, error_file=error_file)


def children(uri: str, exp_name: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(exp_name)
    return [r for r in c.search_runs([exp.experiment_id]) if "xfer.trial_key" in r.data.tags]


def parents(uri: str, exp_name: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(exp_name)
    return c.search_runs([exp.experiment_id], filter_string="tags.`xfer.kind` = 'sweep'")


def save_predictions(path: Path, n: int = 6, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores, targets = rng.normal(size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)
    np.savez(path, scores=scores, targets=targets)
    return scores, targets


def final_result(status: str = "finished", step: int = 4, artifacts: dict | None = None, **metrics: float) -> dict:
    """The trainable's final report: the TrialRecord as JSON (see xfer.sweep.execute_trial)."""
    record = TrialRecord(status=status, metric="top1", metrics=metrics, steps_done=step, seconds=1.5,
                         message="" if status == "finished" else "why", artifacts=artifacts or {},
                         fingerprints={"data": "d123", "weights": "w456"})
    return {"xfer_final": True, "xfer_step": step, "xfer_record": json.dumps(record.to_json())}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _no_leftover_parents():
    yield
    writer._ACTIVE_PARENTS.clear()


# ---------------------------------------------------------------------------------------------

def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, None) == "sqlite:///mlflow.db"
    assert tracking.resolve_tracking_uri(None, "http://spec:5000") == "http://spec:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri(None, "http://spec:5000") == "http://env:5000"
    assert tracking.resolve_tracking_uri("sqlite:///cli.db", "http://spec:5000") == "sqlite:///cli.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking.resolve_tracking_uri(None, "http://spec:5000") == "http://spec:5000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_message():
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server") as e:
        tracking.check_reachable(uri)
    assert time.monotonic() - t0 < 15
    assert uri in str(e.value) and "--tracking-uri" in str(e.value)


def test_server_that_never_answers_times_out():
    with socket.socket() as s:  # accepts connections (kernel backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingError, match="cannot reach"):
            tracking.check_reachable(uri, timeout_s=1)
        assert time.monotonic() - t0 < 10


def test_local_uris_are_checked(tmp_path, monkeypatch):
    tracking.check_reachable(f"sqlite:///{tmp_path}/ok.db")
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.check_reachable(f"sqlite:///{tmp_path}/missing/x.db")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="sqlite:///mlflow.db"):
        tracking.check_reachable(str(tmp_path / "mlruns"))


def test_hierarchy_tags_params_metrics_and_predictions(uri, tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: study\n")
    tracker = SweepTracker(uri, "hier")
    parent = tracker.start_parent({"total": 2, "by_regime": {"finetune": 2},
                                   "by_model_dataset": {"m1 / Digits (8x8)+": 2}}, spec_path=spec_file)
    cb = TrackingCallback(tracker)
    t1, t2 = make_trial(0.1), make_trial(0.01, label="Digits")
    preds = tmp_path / "predictions.npz"
    scores, targets = save_predictions(preds)
    for tid, t in (("a", t1), ("b", t2)):
        ft = fake_trial(t, tid)
        cb.on_trial_start(iteration=0, trials=[], trial=ft)
        for step, loss in ((1, 2.0), (2, 1.5)):
            cb.on_trial_result(iteration=0, trials=[], trial=ft, result={
                "xfer_step": step, "train_loss": loss, "val_top1": 0.1 * step, "training_iteration": step,
                "time_total_s": 1.0, "done": False, "config": {"trial": {}}, "trial_id": tid})
        cb.on_trial_result(iteration=0, trials=[], trial=ft, result={
            **final_result(val_top1=0.3 if tid == "a" else 0.4, train_loss=1.0, artifacts={"predictions": str(preds)})})
        cb.on_trial_complete(iteration=0, trials=[], trial=ft)
    tracker.end_parent("finished")

    c = MlflowClient(uri)
    (p,) = parents(uri, "hier")
    assert p.info.run_id == parent and p.info.status == "FINISHED"
    assert p.data.tags["xfer.sweep"] == "hier" and p.data.tags["xfer.version.mlflow"]
    assert p.data.params["total"] == "2" and p.data.params["by_regime.finetune"] == "2"
    assert p.data.params["by_model_dataset.m1 / Digits _8x8__"] == "2"
    assert "spec.yaml" in [f.path for f in c.list_artifacts(parent)]
    assert len(p.data.tags["xfer.spec_sha256"]) == 64

    kids = children(uri, "hier")
    assert len(kids) == 2
    by_key = {r.data.tags["xfer.trial_key"]: r for r in kids}
    assert set(by_key) == {t1.key, t2.key}
    r = by_key[t1.key]
    tags, params = r.data.tags, r.data.params
    assert tags["mlflow.parentRunId"] == parent
    assert (tags["xfer.model"], tags["xfer.dataset"], tags["xfer.regime"], tags["xfer.stage"]) == \
        ("m1", "digits", "finetune", "grid")
    assert by_key[t2.key].data.tags["xfer.dataset"] == "Digits"  # the label is the display name
    assert tags["xfer.status"] == "finished" and r.info.status == "FINISHED"
    assert r.info.run_name == "m1/digits/finetune lr=0.1 wd=0.0001"
    assert float(params["lr"]) == 0.1 and float(params["wd"]) == 1e-4
    assert params["steps"] == "4" and params["batch_size"] == "8" and params["seed"] == "0"
    assert params["weights"] == "random" and params["arch"] == "test_resnet" and params["dataset.n_per_class"] == "3"
    hist = c.get_metric_history(r.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.0), (2, 1.5), (4, 1.0)]
    assert r.data.metrics["val_top1"] == pytest.approx(0.3)
    # the trial record's timing, metric name and fingerprints reach the run
    assert r.data.metrics["trial_seconds"] == pytest.approx(1.5) and tags["xfer.metric"] == "top1"
    assert tags["xfer.fingerprint.data"] == "d123" and tags["xfer.fingerprint.weights"] == "w456"
    for ray_key in ("training_iteration", "time_total_s", "done", "xfer_step", "xfer_final"):
        assert ray_key not in r.data.metrics

    s, tg = tracking.load_predictions(uri, r.info.run_id)
    np.testing.assert_array_equal(s, scores)
    np.testing.assert_array_equal(tg, targets)


def test_rerun_and_restore_reuse_the_run_and_failures_are_marked(uri, tmp_path):
    ta, tb = make_trial(0.1), make_trial(0.01)
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback (most recent call last):\n  File x\nRuntimeError: boom\n")

    tracker = SweepTracker(uri, "rerun")
    parent1 = tracker.start_parent({"total": 2})
    cb = TrackingCallback(tracker)
    fa, fb = fake_trial(ta, "a", str(err)), fake_trial(tb, "b")
    for ft in (fa, fb):
        cb.on_trial_start(iteration=0, trials=[], trial=ft)
    cb.on_trial_result(iteration=0, trials=[], trial=fa, result={"xfer_step": 1, "train_loss": 3.0})
    cb.on_trial_error(iteration=0, trials=[], trial=fa)
    cb.on_trial_complete(iteration=0, trials=[], trial=fb)  # ended without a final result
    tracker.end_parent("failed")

    runs = {r.data.tags["xfer.trial_key"]: r for r in children(uri, "rerun")}
    assert runs[ta.key].data.tags["xfer.status"] == "failed" and runs[ta.key].info.status == "FAILED"
    assert runs[ta.key].data.tags["xfer.message"] == "RuntimeError: boom"
    assert "error.txt" in [f.path for f in MlflowClient(uri).list_artifacts(runs[ta.key].info.run_id)]
    assert runs[tb.key].data.tags["xfer.status"] == "failed"
    assert tracking.finished_keys(uri, "rerun") == set()
    first_a = runs[ta.key].info.run_id

    # a second invocation (fresh objects, as a new process would have) retries the failed trial
    tracker2 = SweepTracker(uri, "rerun")
    assert tracker2.existing([ta.key, "nope"]) == {ta.key: (first_a, "failed")}
    parent2 = tracker2.start_parent({"total": 2})
    cb2 = TrackingCallback(tracker2)
    fa2 = fake_trial(ta, "a2")
    cb2.on_trial_start(iteration=0, trials=[], trial=fa2)
    # a restored Tuner calls on_trial_start again on its unpickled callback (carrying the old parent)
    import ray.cloudpickle as cloudpickle

    stale = TrackingCallback(SweepTracker(uri, "rerun"))
    stale.tracker._parent_run_id = parent1
    restored = cloudpickle.loads(cloudpickle.dumps(stale))
    restored.on_trial_start(iteration=0, trials=[], trial=fake_trial(ta, "a3"))
    cb2.on_trial_result(iteration=0, trials=[], trial=fa2, result=final_result(val_top1=0.5))
    cb2.on_trial_error(iteration=0, trials=[], trial=fake_trial(ta, "a2", str(err)))  # after the result
    # Tune hands a restored callback its saved state; trials that finished before stay untouched
    later = TrackingCallback(tracker2)
    later.set_state(cb2.get_state())
    later.on_trial_complete(iteration=0, trials=[], trial=fa2)
    later.on_experiment_end(trials=[fa2])
    tracker2.end_parent()

    kids = children(uri, "rerun")
    assert len(kids) == 2  # still one run per key
    again = next(r for r in kids if r.data.tags["xfer.trial_key"] == ta.key)
    assert again.info.run_id == first_a
    assert again.data.tags["mlflow.parentRunId"] == parent2 != parent1
    assert again.data.tags["xfer.status"] == "finished" and again.info.status == "FINISHED"
    assert int(again.data.tags["xfer.attempt"]) == 3
    assert again.data.tags["xfer.error_after_result"] == "RuntimeError: boom"
    assert tracking.finished_keys(uri, "rerun") == {ta.key}
    assert tracking.finished_keys(uri, "rerun", stage="final") == set()
    assert tracking.finished_keys(uri, "no-such-sweep") == set()


def test_load_runs_table(uri, tmp_path):
    tracker = SweepTracker(uri, "table")
    tracker.start_parent({"total": 3})
    cb = TrackingCallback(tracker)
    lp = make_trial(1e-3, regime="linear_probe")
    ft = make_trial(0.1, 1e-5)
    div = make_trial(1.0, 0.0)
    fin = make_trial(0.1, 1e-5, stage="final")
    results = {
        lp.key: final_result(val_top1=0.7),
        ft.key: final_result(val_top1=0.8),
        div.key: final_result("diverged", step=1),
        fin.key: final_result(test_top1=0.75, source_top1=0.61),
    }
    for i, t in enumerate((lp, ft, div, fin)):
        tr = fake_trial(t, str(i))
        cb.on_trial_start(iteration=0, trials=[], trial=tr)
        cb.on_trial_result(iteration=0, trials=[], trial=tr, result=results[t.key])
    df = tracking.load_runs(uri, "table")
    assert list(df.columns) == schema.runs_columns()
    assert len(df) == 4  # the parent run is not a row
    rows = df.set_index("trial_key")
    assert rows.loc[lp.key, "regime"] == "linear_probe" and rows.loc[lp.key, "l2"] == 1e-3
    assert math.isnan(rows.loc[lp.key, "lr"]) and math.isnan(rows.loc[lp.key, "wd"])
    assert rows.loc[ft.key, "lr"] == 0.1 and rows.loc[ft.key, "wd"] == 1e-5 and math.isnan(rows.loc[ft.key, "l2"])
    assert rows.loc[ft.key, "val"] == pytest.approx(0.8) and math.isnan(rows.loc[ft.key, "test"])
    assert rows.loc[ft.key, "metric"] == "top1" and rows.loc[ft.key, "status"] == "finished"
    assert rows.loc[ft.key, "source_top1"] == 0.5  # the model's spec value (a param)
    assert rows.loc[div.key, "status"] == "diverged" and math.isnan(rows.loc[div.key, "val"])
    assert rows.loc[fin.key, "stage"] == "final" and rows.loc[fin.key, "test"] == pytest.approx(0.75)
    assert rows.loc[fin.key, "source_top1"] == pytest.approx(0.61)  # a measured value wins
    assert df["seed"].tolist() == [0, 0, 0, 0]
    assert isinstance(df["start_time"].dtype, pd.DatetimeTZDtype)
    assert (df["model"] == "m1").all() and (df["dataset"] == "digits").all()
    with pytest.raises(TrackingError, match="no MLflow experiment named 'nope'.*table"):
        tracking.load_runs(uri, "nope")
    SweepTracker(uri, "empty").experiment_id  # creates the experiment
    empty = tracking.load_runs(uri, "empty")
    assert empty.empty and list(empty.columns) == schema.runs_columns()
    with pytest.raises(TrackingError, match="no predictions.npz"):
        tracking.load_predictions(uri, rows.loc[ft.key, "run_id"])


def test_sampled_values_at_the_top_of_the_config(uri):
    """A searcher (Optuna) samples lr into the Ray config beside the trial: the run is that grid point's."""
    tracker = SweepTracker(uri, "sampled")
    tracker.start_parent({"total": 1})
    cb = TrackingCallback(tracker)
    base = make_trial(0.1)
    tr = SimpleNamespace(trial_id="s", config={"trial": base.to_dict(), "lr": 0.05}, error_file=None)
    cb.on_trial_start(iteration=0, trials=[], trial=tr)
    (r,) = children(uri, "sampled")
    assert r.data.params["lr"] == "0.05"
    assert r.data.tags["xfer.trial_key"] == make_trial(0.05).key != base.key
    with pytest.raises(ValueError, match="no 'trial' entry"):
        TrackingCallback(tracker).on_trial_start(iteration=0, trials=[], trial=SimpleNamespace(
            trial_id="t", config={"lr": 0.1}, error_file=None))


# ---------------------------------------------------------------------------------------------
# A real tracking server
# ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_against_a_real_mlflow_server(tmp_path):
    from mlflow_server import Server

    server = Server(tmp_path)
    uri = server.uri
    server.start()
    try:
        tracking.check_reachable(uri, timeout_s=5)

        tracker = SweepTracker(uri, "served")
        parent = tracker.start_parent({"total": 1})
        cb = TrackingCallback(tracker)
        t = make_trial(0.1, stage="final")
        tr = fake_trial(t, "x")
        preds = tmp_path / "predictions.npz"
        scores, targets = save_predictions(preds, seed=3)
        cb.on_trial_start(iteration=0, trials=[], trial=tr)
        cb.on_trial_result(iteration=0, trials=[], trial=tr, result={"xfer_step": 1, "train_loss": 0.5})
        cb.on_trial_result(iteration=0, trials=[], trial=tr, result={
            **final_result(test_top1=0.9, artifacts={"predictions": str(preds)})})
        report = tmp_path / "report.md"
        report.write_text("# report\n")
        tracking.log_report(uri, parent, [report])
        tracker.end_parent()

        df = tracking.load_runs(uri, "served")
        assert len(df) == 1 and df.loc[0, "test"] == pytest.approx(0.9) and df.loc[0, "stage"] == "final"
        s, tg = tracking.load_predictions(uri, df.loc[0, "run_id"])
        np.testing.assert_array_equal(s, scores)
        np.testing.assert_array_equal(tg, targets)
        assert [f.path for f in MlflowClient(uri).list_artifacts(parent, "report")] == ["report/report.md"]
        assert [r.info.run_id for r in parents(uri, "served")] == [parent]
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# A real Ray Tune run
# ---------------------------------------------------------------------------------------------

def _trainable(config: dict) -> None:
    """A trivial function trainable speaking the xfer result protocol; fails while its flag file exists."""
    from ray import tune

    trial = config["trial"]
    if Path(config["fail_flag"]).exists() and trial["hparams"]["lr"] == 0.01:
        raise RuntimeError("boom from the trainable")
    for step in (1, 2):
        tune.report({"xfer_step": step, "train_loss": 1.0 / step, "val_top1": 0.2 * step})
    out = Path(config["out_dir"]) / f"pred-{trial['hparams']['lr']}"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(out / "predictions.npz", scores=rng.normal(size=(4, 3)), targets=np.arange(4) % 3)
    record = TrialRecord(status="finished", metric="top1", metrics={"val_top1": 0.4}, steps_done=2,
                         artifacts={"predictions": str(out / "predictions.npz")})
    tune.report({"xfer_final": True, "xfer_step": 2, "xfer_record": json.dumps(record.to_json())})


@pytest.fixture(scope="module")
def local_ray():
    """A one-CPU local Ray (token auth off); reuses one another test module started."""
    import ray
    import ray.cloudpickle

    # the trainable travels by value: workers need not import this test module
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    try:
        if ray.is_initialized():
            yield ray
            return
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "disabled")
            mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024 ** 2,
                     log_to_driver=False)
            try:
                yield ray
            finally:
                ray.shutdown()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)


def _fit(tracker: SweepTracker, trials: list[TrialSpec], storage: Path, flag: Path, name: str):
    from ray import tune

    space = {"trial": tune.grid_search([t.to_dict() for t in trials]), "fail_flag": str(flag),
             "out_dir": str(storage / "out")}
    tuner = tune.Tuner(_trainable, param_space=space, run_config=tune.RunConfig(
        name=name, storage_path=str(storage), callbacks=[TrackingCallback(tracker)], verbose=0))
    return tuner.fit()


@pytest.mark.integration
def test_real_ray_tune_run(uri, tmp_path, local_ray):
    good, bad = make_trial(0.1), make_trial(0.01)
    flag = tmp_path / "fail"
    flag.touch()
    tracker = SweepTracker(uri, "tuned")
    parent1 = tracker.start_parent({"total": 2})
    results = _fit(tracker, [good, bad], tmp_path / "ray", flag, "first")
    tracker.end_parent()
    assert len(results.errors) == 1

    df = tracking.load_runs(uri, "tuned").set_index("trial_key")
    assert len(df) == 2
    assert df.loc[good.key, "status"] == "finished" and df.loc[good.key, "val"] == pytest.approx(0.4)
    assert df.loc[bad.key, "status"] == "failed"
    c = MlflowClient(uri)
    good_run = c.get_run(df.loc[good.key, "run_id"])
    assert good_run.data.tags["mlflow.parentRunId"] == parent1
    assert sorted(m.step for m in c.get_metric_history(good_run.info.run_id, "train_loss")) == [1, 2]
    assert "training_iteration" not in good_run.data.metrics
    s, tg = tracking.load_predictions(uri, good_run.info.run_id)
    assert s.shape == (4, 3) and tg.tolist() == [0, 1, 2, 0]
    bad_run = c.get_run(df.loc[bad.key, "run_id"])
    assert "boom from the trainable" in bad_run.data.tags["xfer.message"]

    # rerun (a new invocation): the sweep skips finished keys and retries the failed one, which
    # fails again here, into its existing run
    todo = [t for t in (good, bad) if t.key not in tracking.finished_keys(uri, "tuned")]
    assert todo == [bad]
    tracker2 = SweepTracker(uri, "tuned")
    parent2 = tracker2.start_parent({"total": 1})
    _fit(tracker2, todo, tmp_path / "ray", flag, "second")
    tracker2.end_parent("failed")
    assert len(children(uri, "tuned")) == 2
    run2 = c.get_run(df.loc[bad.key, "run_id"])
    assert run2.data.tags["mlflow.parentRunId"] == parent2 and run2.data.tags["xfer.status"] == "failed"

    # Tuner.restore unpickles the callback it was built with (tied to parent2); the restarted trial
    # logs into the same run under the current invocation's parent
    from ray import tune

    flag.unlink()
    tracker3 = SweepTracker(uri, "tuned")
    parent3 = tracker3.start_parent({"total": 1})
    tune.Tuner.restore(str(tmp_path / "ray" / "second"), _trainable, restart_errored=True).fit()
    tracker3.end_parent()
    df3 = tracking.load_runs(uri, "tuned").set_index("trial_key")
    assert len(df3) == 2 and set(df3["status"]) == {"finished"}
    assert df3.loc[bad.key, "run_id"] == df.loc[bad.key, "run_id"]
    run3 = c.get_run(df3.loc[bad.key, "run_id"])
    assert run3.data.tags["mlflow.parentRunId"] == parent3
    assert run3.data.tags["xfer.attempt"] == "3"
