"""Backbones from every weight source, preprocessing, errors, and the source-accuracy table."""
from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch

from xfer import models
from xfer.models import (MissingCheckpointError, ModelLoadError, load_backbone, published_top1, source_table,
                         source_top1)
from xfer.contract import RunContext
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec

ARCH = "test_resnet"


@pytest.fixture
def ctx(tmp_path):
    return RunContext.local(storage=tmp_path / "storage", data_root=tmp_path / "data")


def _saved_state(tmp_path, arch=ARCH, seed=123, num_classes=1000, name="weights.pth"):
    """A timm-format state dict on disk (what a hub download or a user's file holds)."""
    torch.manual_seed(seed)
    state = timm.create_model(arch, num_classes=num_classes).state_dict()
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def _body_equal(module, state, head="fc"):
    """Every non-head tensor of ``module`` equals the saved one."""
    got = module.state_dict()
    body = [k for k in state if not k.startswith(head + ".")]
    assert body and all(torch.equal(got[k], state[k]) for k in body)


def _pretrain_spec(**kw):
    return ModelSpec(name="src", arch=ARCH, weights="pretrain", input_size=32,
                     pretrain=PretrainSpec(dataset=DatasetRef("synthetic_source"), options={"steps": 5}), **kw)


# ------------------------------------------------------------------ random
def test_random_is_seeded_and_has_the_new_head(ctx):
    spec = ModelSpec(name="m", arch=ARCH, weights="random")
    a = load_backbone(spec, num_classes=7, ctx=ctx, seed=0)
    b = load_backbone(spec, num_classes=7, ctx=ctx, seed=0)
    c = load_backbone(spec, num_classes=7, ctx=ctx, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert not torch.equal(a.model.conv1[0].weight, c.model.conv1[0].weight)
    assert a.model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert a.fingerprint == "random:test_resnet:seed=0" != c.fingerprint


def test_loading_does_not_disturb_the_callers_rng(ctx):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_backbone(ModelSpec(name="m", arch=ARCH, weights="random"), num_classes=3, ctx=ctx, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_num_classes_zero_gives_pooled_features(ctx):
    bb = load_backbone(ModelSpec(name="m", arch=ARCH, weights="random"), num_classes=0, ctx=ctx)
    out = bb.model.eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, bb.model.num_features) == (3, 96)


def test_negative_num_classes_is_refused(ctx):
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_backbone(ModelSpec(name="m", arch=ARCH, weights="random"), num_classes=-1, ctx=ctx)


# ------------------------------------------------------------------ preprocessing
def test_preprocessing_comes_from_timm_and_input_size_overrides(ctx):
    default = load_backbone(ModelSpec(name="m", arch=ARCH, weights="random"), num_classes=2, ctx=ctx)
    cfg = timm.data.resolve_model_data_config(default.model)
    assert default.data_config.input_size == cfg["input_size"][-1] == 160
    assert default.data_config.mean == tuple(cfg["mean"]) and default.data_config.crop_pct == cfg["crop_pct"]
    small = load_backbone(ModelSpec(name="m", arch=ARCH, weights="random", input_size=32), num_classes=2, ctx=ctx)
    assert small.data_config.input_size == 32
    assert small.data_config.interpolation == default.data_config.interpolation


def test_fixed_size_models_are_built_for_the_overridden_size(ctx):
    assert timm.models.get_pretrained_cfg("test_vit").fixed_input_size
    bb = load_backbone(ModelSpec(name="v", arch="test_vit", weights="random", input_size=32), num_classes=4, ctx=ctx)
    assert tuple(bb.model.patch_embed.img_size) == (32, 32)
    assert bb.model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


# ------------------------------------------------------------------ file and hub
def test_file_source_loads_every_body_tensor_and_drops_the_head(ctx, tmp_path):
    path, state = _saved_state(tmp_path)
    bb = load_backbone(ModelSpec(name="m", arch=ARCH, weights="file", weights_file=str(path)), num_classes=5, ctx=ctx)
    _body_equal(bb.model, state)
    assert bb.model.fc.weight.shape == (5, 96)
    assert bb.fingerprint == "file:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_a_head_of_the_same_size_is_still_new(ctx, tmp_path):
    path, state = _saved_state(tmp_path, num_classes=6)
    bb = load_backbone(ModelSpec(name="m", arch=ARCH, weights="file", weights_file=str(path)), num_classes=6, ctx=ctx)
    _body_equal(bb.model, state)
    assert not torch.equal(bb.model.fc.weight, state["fc.weight"])


def test_file_of_another_architecture_is_refused(ctx, tmp_path):
    path, _ = _saved_state(tmp_path, arch="test_convnext")
    with pytest.raises(ModelLoadError, match="does not match timm architecture 'test_resnet'"):
        load_backbone(ModelSpec(name="m", arch=ARCH, weights="file", weights_file=str(path)), num_classes=5, ctx=ctx)


def test_missing_file_is_a_clear_error(ctx, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_backbone(ModelSpec(name="m", arch=ARCH, weights="file", weights_file=str(tmp_path / "nope.pth")),
                      num_classes=5, ctx=ctx)


def test_hub_source_through_timms_pretrained_path(ctx, tmp_path, monkeypatch):
    """The hub loader's real code with timm's real pretrained loading, pointed at a local file
    (what a download would have put in the cache) instead of the network."""
    path, state = _saved_state(tmp_path)
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(path)}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    bb = load_backbone(ModelSpec(name="m", arch="test_resnet.r160_in1k", weights="hub"), num_classes=3, ctx=ctx)
    _body_equal(bb.model, state)
    assert bb.fingerprint == "hub:test_resnet.r160_in1k"
    assert bb.model.fc.out_features == 3


def test_hub_without_network_says_what_to_do(ctx, monkeypatch):
    def no_network(*a, **kw):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(ModelLoadError, match="weights: file"):
        load_backbone(ModelSpec(name="m", arch=ARCH, weights="hub"), num_classes=3, ctx=ctx)


def test_unknown_arch_lists_close_matches(ctx):
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'resnet5'.*resnet50"):
        load_backbone(ModelSpec(name="m", arch="resnet5", weights="random"), num_classes=3, ctx=ctx)


def test_unknown_hub_tag_lists_the_tags(ctx):
    with pytest.raises(ModelLoadError, match="test_resnet.r160_in1k"):
        load_backbone(ModelSpec(name="m", arch="test_resnet.nope", weights="hub"), num_classes=3, ctx=ctx)


# ------------------------------------------------------------------ pretrain checkpoints
def _write_checkpoint(spec, ctx, tmp_path, top1=0.42):
    pth, meta = models.pretrain_checkpoint(spec, ctx)
    pth.parent.mkdir(parents=True)
    torch.manual_seed(7)
    state = timm.create_model(ARCH, num_classes=11).state_dict()
    torch.save(state, pth)
    data_config = {"input_size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                   "interpolation": "bicubic", "crop_pct": 1.0}
    meta.write_text(json.dumps({"arch": ARCH, "num_classes": 11, "data_config": data_config, "source_top1": top1,
                                "trial_key": spec.pretrain_trial().key, "steps": 5, "complete": True}))
    return state


def test_pretrain_checkpoint_round_trip(ctx, tmp_path):
    spec = _pretrain_spec()
    state = _write_checkpoint(spec, ctx, tmp_path)
    bb = load_backbone(spec, num_classes=4, ctx=ctx)
    _body_equal(bb.model, state)
    assert bb.model.fc.out_features == 4
    assert bb.data_config.mean == (0.1, 0.2, 0.3) and bb.data_config.interpolation == "bicubic"
    assert bb.data_config.input_size == 32 and bb.data_config.crop_pct == 1.0
    assert bb.fingerprint.startswith(f"pretrain:{spec.pretrain_trial().key}:")
    assert source_top1(spec, ctx) == pytest.approx(0.42)


def test_missing_pretrain_checkpoint_says_to_run_the_stage(ctx):
    with pytest.raises(MissingCheckpointError, match="pretrain stage must run first"):
        load_backbone(_pretrain_spec(), num_classes=4, ctx=ctx)


def test_incomplete_pretrain_checkpoint_counts_as_missing(ctx):
    spec = _pretrain_spec()
    pth, _ = models.pretrain_checkpoint(spec, ctx)
    pth.parent.mkdir(parents=True)
    torch.save(timm.create_model(ARCH, num_classes=11).state_dict(), pth)  # no meta.json yet
    with pytest.raises(MissingCheckpointError):
        load_backbone(spec, num_classes=4, ctx=ctx)
    assert source_top1(spec, ctx) is None


# ------------------------------------------------------------------ one rule for new heads
HEAD_ARCHS = ["test_resnet", "test_convnext", "test_vit", "test_efficientnet", "mobilenetv2_050", "densenet121"]


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_every_new_head_starts_at_zero(ctx, tmp_path, arch):
    """timm initialises heads per architecture (trunc-normal 0.02, normal 0.01, kaiming…); xfer overrides
    all of them with one rule, for random and loaded bodies alike."""
    size = 32 if arch.startswith("test_") else 64
    assert models.HEAD_INIT == "zeros"
    timm_head = timm.create_model(arch, num_classes=7).get_classifier()
    assert float(timm_head.weight.detach().abs().max()) > 0  # what the rule replaces
    path, _ = _saved_state(tmp_path, arch=arch, num_classes=7)  # same size: the head is still new
    for spec in (ModelSpec(name="m", arch=arch, weights="random", input_size=size),
                 ModelSpec(name="m", arch=arch, weights="file", weights_file=str(path), input_size=size)):
        model = load_backbone(spec, num_classes=7, ctx=ctx, seed=3).model
        head = model.get_classifier()
        assert head.weight.shape[0] == 7
        assert all(float(p.detach().abs().max()) == 0.0 for p in head.parameters()), (arch, spec.weights)
        body = [p for n, p in model.named_parameters() if not any(p is q for q in head.parameters())]
        assert any(float(p.detach().abs().max()) > 0 for p in body)  # only the head is zeroed
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, size, size))
        assert torch.equal(logits, torch.zeros(2, 7))  # uniform predictions at the start, for every architecture
    assert models.init_new_head(load_backbone(ModelSpec(name="m", arch=arch, weights="random", input_size=size),
                                              num_classes=0).model) == 0  # no head, nothing to do


# ------------------------------------------------------------------ source accuracy
PAPER_MODELS = {"Inception v1", "BN-Inception", "Inception v2", "Inception v3", "Inception v4",
                "Inception-ResNet v2", "ResNet-50", "ResNet-101", "ResNet-152", "DenseNet-121", "DenseNet-169",
                "DenseNet-201", "MobileNet v1", "MobileNet v2", "MobileNet v2 (1.4)", "NASNet-A Mobile",
                "NASNet-A Large"}


def test_table_covers_the_paper_models_with_timm_tags():
    rows = source_table()
    assert {r["paper_model"] for r in rows} == PAPER_MODELS
    for r in rows:
        assert r["arch"] in timm.list_pretrained(r["arch"]), r["arch"]
        assert r["top1"] is None or 0.5 < r["top1"] < 0.9
        assert r["source"] in ("results-imagenet.csv", "README.md")
    stand_ins = {r["paper_model"] for r in rows if r["stand_in"]}
    assert stand_ins == {"Inception v1", "BN-Inception", "Inception v2", "NASNet-A Mobile"}


def test_each_figure_is_at_the_size_the_weights_run_at():
    """A figure on the x-axis must be at the resolution the study feeds the network (timm's pretrained
    input size, unless an entry overrides it)."""
    from xfer.source_accuracy import run_input_size

    for r in source_table():
        cfg = timm.models.get_pretrained_cfg(r["arch"])
        assert r["input_size"] == cfg.input_size[-1], r
        assert run_input_size(ModelSpec(name="m", arch=r["arch"])) == r["input_size"]
    mobilenet = next(r for r in source_table() if r["paper_model"] == "MobileNet v1")
    assert (mobilenet["input_size"], mobilenet["top1"]) == (224, pytest.approx(0.75382))  # not the 256 px figure


def test_published_top1_resolves_tags():
    assert published_top1("resnet50.tv_in1k") == pytest.approx(0.7613)
    assert published_top1("nasnetalarge") == pytest.approx(0.82626)  # default tag tf_in1k
    assert published_top1("resnet50") is None  # default tag a1_in1k is not in the table
    assert published_top1(ARCH) is None


def test_source_top1_precedence(ctx, tmp_path):
    hub = ModelSpec(name="r50", arch="resnet50.tv_in1k", weights="hub")
    assert source_top1(hub, ctx) == pytest.approx(0.7613)
    assert source_top1(ModelSpec(name="r50", arch="resnet50.tv_in1k", weights="hub", source_top1=0.5), ctx) == 0.5
    assert source_top1(ModelSpec(name="r", arch="resnet50.tv_in1k", weights="random"), ctx) is None
    spec = _pretrain_spec()
    _write_checkpoint(spec, ctx, tmp_path, top1=0.31)
    assert source_top1(spec, ctx) == pytest.approx(0.31)
    assert source_top1(_pretrain_spec(source_top1=0.9), ctx) == pytest.approx(0.9)
