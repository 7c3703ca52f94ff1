"""The feature store: what is stored, that it is reused, that keys separate what differs, and that a
crash never leaves a half-written entry."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from xfer import features
from xfer.contract import RunContext
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

MODEL = ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32)
NEAR = DatasetRef("synthetic_near")
DIGITS = DatasetRef("digits")


@pytest.fixture
def ctx(tmp_path):
    return RunContext.local(storage=tmp_path / "storage", data_root=tmp_path / "data", device="cpu")


@pytest.fixture
def count_extractions(monkeypatch):
    calls: list[int] = []
    real = features.extract_features

    def spy(*args, **kwargs):
        x, y = real(*args, **kwargs)
        calls.append(len(x))
        return x, y

    monkeypatch.setattr(features, "extract_features", spy)
    return calls


def test_second_call_reads_the_store(ctx, count_extractions):
    x1, y1 = features.get_features(MODEL, DIGITS, "val", ctx)
    assert len(count_extractions) == 1
    path = features.feature_path(features.feature_key(MODEL, DIGITS, "val", ctx), ctx)
    mtime = path.stat().st_mtime_ns
    x2, y2 = features.get_features(MODEL, DIGITS, "val", ctx)
    features.clear_identity_cache()  # as a fresh worker process would: rebuilds to get the key, reads the file
    x3, _ = features.get_features(MODEL, DIGITS, "val", ctx)
    assert len(count_extractions) == 1
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y2)
    assert x1.dtype == torch.float32 and x1.ndim == 2 and len(x1) == len(y1) > 0
    assert torch.isfinite(x1).all()


def test_stored_features_are_the_frozen_eval_mode_pooled_features(ctx):
    from xfer.data import build_from_ref
    from xfer.data.transforms import eval_transform
    from xfer.models import load_backbone

    fs = features.get_feature_set(MODEL, DIGITS, "val", ctx, batch_size=7)  # odd batch: batching must not matter
    backbone = load_backbone(MODEL, num_classes=0, ctx=ctx)
    model = backbone.model
    ds = build_from_ref(DIGITS, data_root=ctx.data_root, download=ctx.download)
    tf = eval_transform(backbone.data_config)
    items = [ds.split("val")[i] for i in range(5)]
    images = torch.stack([tf(img) for img, _ in items])
    model.eval()
    with torch.no_grad():
        expected = model(images)
    assert expected.shape == (5, model.num_features) == (5, fs.features.shape[1])
    torch.testing.assert_close(fs.features[:5], expected, rtol=1e-4, atol=1e-5)
    assert fs.targets[:5].tolist() == [int(t) for _, t in items]
    assert (fs.num_classes, fs.multilabel, fs.metric) == (10, False, ds.info.metric)
    assert fs.meta["split"] == "val" and fs.meta["n"] == len(ds.split("val"))
    # train-mode BN would give other numbers: the comparison above can tell the difference
    model.train()
    with torch.no_grad():
        in_train_mode = model(images)
    assert not torch.allclose(in_train_mode, expected, rtol=1e-3, atol=1e-4)


def test_keys_separate_split_dataset_and_weights(ctx, tmp_path):
    import timm

    k = features.feature_key(MODEL, DIGITS, "train", ctx)
    assert k == features.feature_key(MODEL, DIGITS, "train", ctx)  # stable
    assert k != features.feature_key(MODEL, DIGITS, "val", ctx)
    assert k != features.feature_key(MODEL, NEAR, "train", ctx)
    torch.manual_seed(123)
    other = timm.create_model("test_resnet", num_classes=10)
    wfile = tmp_path / "other.pth"
    torch.save(other.state_dict(), wfile)
    from_file = replace(MODEL, weights="file", weights_file=str(wfile))
    assert k != features.feature_key(from_file, DIGITS, "train", ctx)
    # a different preprocessing (input size) is a different feature
    assert k != features.feature_key(replace(MODEL, input_size=40), DIGITS, "train", ctx)
    # … but where the store lives, the device and the batch size are not part of it
    elsewhere = RunContext.local(storage=tmp_path / "elsewhere", data_root=ctx.data_root, device="cpu")
    assert k == features.feature_key(MODEL, DIGITS, "train", elsewhere)


def test_keys_separate_precision(ctx):
    """bf16 autocast on a GPU and float32 on a CPU give different features: they must not share a key."""
    cpu = features.feature_key(MODEL, DIGITS, "train", ctx)
    gpu = features.feature_key(MODEL, DIGITS, "train", replace(ctx, device="cuda"))
    assert cpu != gpu
    assert features.precision_for("cuda") == "bf16-autocast" and features.precision_for("cpu") == "float32"
    fs = features.get_feature_set(MODEL, DIGITS, "val", ctx)
    assert fs.meta["precision"] == "float32" and fs.meta["dtype"] == "float32"
    assert fs.features.dtype == features.STORED_DTYPE


def test_key_lookups_build_each_model_and_dataset_once(ctx, monkeypatch):
    import xfer.data
    import xfer.models

    calls: list[str] = []
    real_load, real_build = xfer.models.load_backbone, xfer.data.build_from_ref
    monkeypatch.setattr(xfer.models, "load_backbone", lambda m, **kw: calls.append(m.name) or real_load(m, **kw))
    monkeypatch.setattr(xfer.data, "build_from_ref", lambda r, **kw: calls.append(r.name) or real_build(r, **kw))
    features.clear_identity_cache()
    other = replace(MODEL, name="tiny2", input_size=40)
    for model in (MODEL, other):
        for ref in (DIGITS, NEAR):
            for split in ("train", "val", "trainval", "test"):
                features.feature_key(model, ref, split, ctx)
    assert sorted(calls) == sorted(["tiny", "tiny2", "digits", "synthetic_near"])


def test_precompute_makes_the_two_splits_a_stage_reads(ctx, count_extractions, monkeypatch):
    import xfer.models

    builds: list[str] = []
    real_load = xfer.models.load_backbone

    def spy_load(model, **kw):
        builds.append(model.name)
        return real_load(model, **kw)

    monkeypatch.setattr(xfer.models, "load_backbone", spy_load)
    trial = TrialSpec(model=MODEL, dataset=DIGITS, regime="linear_probe", hparams={"l2": 1e-3},
                      options={"batch_size": 128}, stage="grid")
    keys = features.precompute(trial, ctx)
    assert builds == ["tiny"]  # one backbone build serves the key and both extractions
    assert keys == [features.feature_key(MODEL, DIGITS, s, ctx) for s in ("train", "val")]
    final_keys = features.precompute(replace(trial, stage="final"), ctx)
    assert final_keys == [features.feature_key(MODEL, DIGITS, s, ctx) for s in ("trainval", "test")]
    assert sorted(p.name for p in ctx.layout.features_dir.iterdir()) == sorted(f"{k}.pt" for k in keys + final_keys)
    n = len(count_extractions)
    assert n == 4
    features.precompute(replace(trial, hparams={"l2": 1.0}), ctx)  # another λ: same features
    assert len(count_extractions) == n


def test_precompute_both_stages_in_one_pass(ctx, count_extractions):
    trial = TrialSpec(model=MODEL, dataset=DIGITS, regime="linear_probe", hparams={"l2": 1e-3}, options={})
    keys = features.precompute(trial, ctx, stages=("grid", "final"))
    assert keys == [features.feature_key(MODEL, DIGITS, s, ctx) for s in ("train", "val", "trainval", "test")]
    assert len(count_extractions) == 4 and len(set(keys)) == 4


def test_a_crash_while_writing_leaves_no_entry(ctx, monkeypatch, count_extractions):
    real_save = torch.save

    def crash(obj, f, *a, **kw):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        features.get_features(MODEL, DIGITS, "val", ctx)
    key = features.feature_key(MODEL, DIGITS, "val", ctx)
    assert not features.feature_path(key, ctx).exists()
    assert list(ctx.layout.features_dir.iterdir()) == []  # no stray temporary file either
    monkeypatch.setattr(torch, "save", real_save)
    x, _ = features.get_features(MODEL, DIGITS, "val", ctx)
    assert features.feature_path(key, ctx).exists() and len(x) > 0


def test_a_damaged_entry_is_recomputed(ctx, count_extractions, caplog):
    features.get_features(MODEL, DIGITS, "val", ctx)
    path = features.feature_path(features.feature_key(MODEL, DIGITS, "val", ctx), ctx)
    path.write_bytes(b"garbage")
    x, _ = features.get_features(MODEL, DIGITS, "val", ctx)
    assert len(count_extractions) == 2 and len(x) > 0
    assert "unreadable entry" in caplog.text
    assert not any(p.name.endswith(".tmp") for p in ctx.layout.features_dir.iterdir())


def test_unknown_split_is_a_clear_error(ctx):
    with pytest.raises(features.FeatureStoreError, match="valid: train, val, trainval, test"):
        features.feature_key(MODEL, DIGITS, "validation", ctx)
    assert not os.path.exists(ctx.layout.features_dir)
