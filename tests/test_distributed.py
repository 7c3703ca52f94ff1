"""Data-parallel source training: a pretrain trial on two CPU workers (Ray Train, gloo) writes the same
checkpoint as the same trial on one worker, up to float rounding (global-batch sharding, gradients
averaged, batch-norm statistics over the global batch)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from xfer import models
from xfer.contract import RunContext
from xfer.layout import StorageLayout
from xfer.regimes import run_trial
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec

SOURCE = DatasetRef("synthetic_source", {"num_classes": 4, "train_per_class": 24, "test_per_class": 8})
# dropout masks are drawn per rank, so the bitwise comparison runs without dropout; the attached
# auxiliary head (with its own batch norm) and label smoothing stay on
OPTIONS = {"steps": 6, "batch_size": 16, "lr": 0.05, "dropout": 0.0, "aux_head": "attached",
           "label_smoothing": 0.1, "log_every": 3, "checkpoint_every": 0}


def _trial():
    spec = ModelSpec(name="dp", arch="test_resnet", weights="pretrain", input_size=32,
                     pretrain=PretrainSpec(dataset=SOURCE, options=OPTIONS))
    return spec.pretrain_trial()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # three logical CPUs: the Tune trial that drives a data-parallel run, and its two workers
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024 * 1024,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_two_cpu_workers_write_the_checkpoint_one_worker_writes(tmp_path, local_ray):
    from xfer.distributed import Workers, run_data_parallel

    trial = _trial()
    one = StorageLayout(tmp_path / "one", tmp_path / "data")
    single = run_trial(trial, RunContext(layout=one, work_dir=one.work_dir(trial.key)))
    assert single.status == "finished", single.message

    two = StorageLayout(tmp_path / "two", tmp_path / "data")
    record = run_data_parallel(trial, two, Workers(count=2, cpu=1), download=False)
    assert record.status == "finished", record.message

    a = torch.load(one.checkpoint_dir(trial.key) / "model.pth")
    b = torch.load(two.checkpoint_dir(trial.key) / "model.pth")
    assert a.keys() == b.keys() and not any(k.startswith("AuxLogits") for k in a)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-4, f"largest difference {worst}"
    # and training did move them: the comparison is not between two untouched initialisations
    init = models.load_backbone(trial.model, num_classes=4, seed=trial.seed).model.state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-3
    meta = json.loads((two.checkpoint_dir(trial.key) / "meta.json").read_text())
    assert meta["workers"] == 2 and meta["regularizers"]["aux_head"] == "attached"
    assert record.metrics["source_top1"] == pytest.approx(single.metrics["source_top1"], abs=1.0 / 32)
    assert record.steps_done == single.steps_done == 6


@pytest.mark.integration
def test_a_sweep_runs_a_two_worker_pretrain_trial_as_one_trial_and_one_run(tmp_path, local_ray):
    import mlflow
    import yaml

    from xfer.spec import load_spec
    from xfer.sweep import run_sweep

    raw = {"name": "dp", "seeds": [0], "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
           "models": [{"name": "dp", "arch": "test_resnet", "input_size": 32, "weights": "pretrain",
                       "pretrain": {"dataset": {"name": SOURCE.name, **SOURCE.options}, **OPTIONS}}],
           "datasets": ["digits"],
           "regimes": {"linear_probe": {"grid": {"l2": [1e-2]}}},
           "resources": {"pretrain": {"workers": 2, "cpu": 1}, "linear_probe": {"cpu": 1}},
           "final": {"enabled": False}}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_sweep(spec, tracking_uri=uri, quiet=True, stream=io.StringIO())
    pre = next(s for s in result.stages if s.stage == "pretrain")
    assert pre.statuses == {"finished": 1}

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("dp")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("xfer.stage") == "pretrain"]
    assert len(runs) == 1 and runs[0].data.tags["xfer.status"] == "finished"
    losses = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert {m.step for m in losses} == {3, 6}  # step 3 comes only from the workers' per-step reports
    trial = spec.pretrain_trials()[0]
    meta = json.loads((Path(tmp_path / "store") / "checkpoints" / trial.key / "meta.json").read_text())
    assert meta["workers"] == 2 and meta["source_top1"] == pytest.approx(runs[0].data.metrics["source_top1"])
