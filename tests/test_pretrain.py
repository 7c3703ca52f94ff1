"""Source training: a short run on the synthetic source task writes a loadable checkpoint whose
measured source accuracy beats chance, and a second call reuses it without training."""
from __future__ import annotations

import json

import pytest
import torch

from xfer import engine, models
from xfer.contract import RunContext
from xfer.regimes import REGIMES, run_trial
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec

SOURCE = DatasetRef("synthetic_source", {"num_classes": 8, "train_per_class": 60, "test_per_class": 20})
CLASSES = 8


def _model(steps=150):
    return ModelSpec(name="resnet-src", arch="test_resnet", weights="pretrain", input_size=32,
                     pretrain=PretrainSpec(dataset=SOURCE, options={"steps": steps, "batch_size": 64, "lr": 0.1}))


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: later tests find the checkpoints earlier ones made (as a sweep would)."""
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture
def ctx(storage):
    return RunContext.local(storage=storage / "storage", data_root=storage / "data", work_dir=storage / "work")


def test_pretrain_writes_a_loadable_checkpoint_and_is_idempotent(ctx, monkeypatch):
    spec = _model()
    trial = spec.pretrain_trial()
    r = run_trial(trial, ctx)
    assert r.status == "finished", r.message
    top1 = r.metrics["source_top1"]
    assert top1 == r.metrics["test_top1"]
    assert top1 > 3.0 / CLASSES  # three times chance (1/8); about 0.58 after 150 steps
    folder = ctx.layout.checkpoint_dir(trial.key)
    assert r.artifacts == {"checkpoint": str(folder / "model.pth")}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] and meta["arch"] == "test_resnet" and meta["num_classes"] == CLASSES
    assert meta["source_top1"] == top1 and meta["steps"] == 150 and meta["trial_key"] == trial.key
    assert meta["data_config"]["input_size"] == 32
    assert not list(folder.glob(".*tmp*"))  # atomic writes leave no temporary files

    # the transfer regimes load it: same body weights, new head, recorded preprocessing and accuracy
    saved = torch.load(folder / "model.pth")
    bb = models.load_backbone(spec, num_classes=3, ctx=ctx)
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items() if not k.startswith("fc."))
    assert saved["fc.weight"].shape[0] == CLASSES and got["fc.weight"].shape[0] == 3
    assert models.source_top1(spec, ctx) == pytest.approx(top1)

    # a second call returns the recorded result without training
    def no_training(*a, **kw):
        raise AssertionError("retrained an existing checkpoint")

    monkeypatch.setattr(engine, "train", no_training)
    mtime = (folder / "model.pth").stat().st_mtime_ns
    again = run_trial(trial, ctx)
    assert again.status == "finished", again.message
    assert again.metrics == r.metrics and again.artifacts == r.artifacts
    assert (folder / "model.pth").stat().st_mtime_ns == mtime


def test_longer_source_training_is_more_accurate_and_keys_differ(ctx):
    short, long = _model(steps=8).pretrain_trial(), _model(steps=150).pretrain_trial()
    assert short.key != long.key
    r_short, r_long = run_trial(short, ctx), run_trial(long, ctx)
    assert r_short.status == r_long.status == "finished"
    assert r_long.metrics["source_top1"] > r_short.metrics["source_top1"]


def test_pretrain_has_no_grid_and_validates_options(ctx):
    regime = REGIMES.get("pretrain")
    assert regime.axes == () and {"steps", "batch_size", "lr", "wd", "label_smoothing"} <= set(regime.defaults)
    assert regime.defaults["label_smoothing"] == 0.1  # the paper's recipe (App. A.3) is the default
    bad = ModelSpec(name="m", arch="test_resnet", weights="pretrain", input_size=32,
                    pretrain=PretrainSpec(dataset=SOURCE, options={"stesp": 3})).pretrain_trial()
    r = run_trial(bad, ctx)
    assert r.status == "failed" and "stesp" in r.message and "label_smoothing" in r.message
