"""A cell's λ grid runs as one task (the probe's warm-started path) while every λ keeps its own trial
key, result and MLflow run: selection, reruns and the UI see the same trials as before."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest

from xfer.contract import RunContext
from xfer.regimes import REGIMES, run_trial, run_trials
from xfer.sweep import execute_batch, trial_configs
from xfer.tracking import load_runs, writer
from xfer.tracking.writer import SweepTracker, TrackingCallback
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

MODEL = ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32, source_top1=0.4)
L2S = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def probe(l2: float, model: ModelSpec = MODEL, stage: str = "grid") -> TrialSpec:
    return TrialSpec(model=model, dataset=DatasetRef("digits"), regime="linear_probe", hparams={"l2": l2},
                     options=REGIMES.get("linear_probe").defaults, stage=stage)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    root = tmp_path_factory.mktemp("batch")
    return RunContext.local(root / "storage", root / "data", device="cpu")


def test_the_path_matches_independent_trials(ctx):
    trials = [probe(l2) for l2 in L2S]
    together = run_trials(trials, ctx)
    alone = [run_trial(t, ctx) for t in trials]
    assert [r.status for r in together] == ["finished"] * len(L2S)
    for t, a, b in zip(trials, together, alone):
        assert abs(a.metrics["val_top1"] - b.metrics["val_top1"]) <= 0.003, t.hparams  # within 0.3 points
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-4)
    best = max(b.metrics["val_top1"] for b in alone)
    chosen = max(range(len(L2S)), key=lambda i: (together[i].metrics["val_top1"], L2S[i]))
    assert alone[chosen].metrics["val_top1"] >= best - 0.003  # the same λ, or an equally good one


def test_trial_configs_batch_a_cells_grid_only():
    lp = [probe(l2) for l2 in L2S]
    other = [probe(l2, model=ModelSpec(name="other", arch="test_byobnet", weights="random", input_size=32))
             for l2 in L2S[:2]]
    ft = [TrialSpec(MODEL, DatasetRef("digits"), "finetune", {"lr": lr, "wd": 0.0}, {"steps": 2}) for lr in (0.1, 0.01)]
    configs = trial_configs(lp + other + ft + [probe(1e-2, stage="final")])
    sizes = sorted(len(c.get(writer.BATCH, [c])) for c in configs)
    assert sizes == [1, 1, 1, 2, 5]  # two fine-tune trials and a final trial alone; each cell's λ grid together
    batch = next(c for c in configs if len(c.get(writer.BATCH, [])) == 5)
    assert [TrialSpec.from_dict(d).key for d in batch[writer.BATCH]] == [t.key for t in lp]
    assert len(trial_configs(lp, batch=False)) == 5


def test_a_batch_becomes_one_run_per_trial(ctx, tmp_path):
    trials = [probe(l2) for l2 in L2S[:3]]
    result = execute_batch([(t, []) for t in trials], ctx.layout, download=False)
    config = {"trial": trial_configs(trials)[0]}
    entries = writer.final_entries(config, result)
    assert [e["key"] for e in entries] == [t.key for t in trials]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "batched", journal_dir=tmp_path / "journal")
    tracker.start_parent({"total": 3})
    cb = TrackingCallback(tracker)
    ray_trial = SimpleNamespace(trial_id="b", config=config, error_file=None)
    cb.on_trial_start(iteration=0, trials=[], trial=ray_trial)  # no run for the batch itself
    cb.on_trial_result(iteration=0, trials=[], trial=ray_trial, result=result)
    cb.on_trial_complete(iteration=0, trials=[], trial=ray_trial)
    runs = load_runs(uri, "batched")
    assert sorted(runs["trial_key"]) == sorted(t.key for t in trials)
    assert (runs["status"] == "finished").all() and sorted(runs["l2"]) == sorted(L2S[:3])
    assert runs["source_top1"].tolist() == [0.4] * 3
    client = mlflow.MlflowClient(uri)
    parent = tracker.parent_run_id
    assert all(client.get_run(r).data.tags["mlflow.parentRunId"] == parent for r in runs["run_id"])
    assert not list((tmp_path / "journal").glob("*.json"))
    vals = {json.loads(e["record"])["metrics"]["val_top1"] for e in entries}
    assert set(runs["val"]) == vals


def test_cheap_trials_of_a_cell_share_a_task(ctx):
    """trials_per_task: fine-tune trials of one cell run back to back in one Ray task, each in its own
    work folder with its own record — and the same result as run alone."""
    ft = [TrialSpec(MODEL, DatasetRef("digits"), "finetune", {"lr": lr, "wd": 0.0},
                    {**REGIMES.get("finetune").defaults, "steps": 3, "batch_size": 16}) for lr in (0.1, 0.03, 0.01)]
    other = TrialSpec(ModelSpec(name="other", arch="test_byobnet", weights="random", input_size=32),
                      DatasetRef("digits"), "finetune", {"lr": 0.1, "wd": 0.0}, ft[0].options)
    configs = trial_configs(ft + [other], per_task={"finetune": 2})
    sizes = sorted(len(c.get(writer.BATCH, [c])) for c in configs)
    assert sizes == [1, 1, 2]  # a cell's three trials in chunks of two; another model's cell apart
    assert trial_configs(ft, per_task={"finetune": 1}) == trial_configs(ft)  # the default: one trial per task
    result = execute_batch([(t, []) for t in ft[:2]], ctx.layout, download=False)
    entries = json.loads(result[writer.BATCH])
    assert [TrialSpec.from_dict(e["trial"]).key for e in entries] == [t.key for t in ft[:2]]
    alone = run_trial(ft[1], RunContext(layout=ctx.layout, download=False, work_dir=ctx.layout.work_dir(ft[1].key)))
    together = json.loads(entries[1]["record"])
    assert together["status"] == "finished" and together["metrics"]["val_top1"] == alone.metrics["val_top1"]
