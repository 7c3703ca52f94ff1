"""The paper's protocol under test: the values in the sweep files, the learning rate and batch-norm
momentum a running fine-tune trial actually uses at every step, and train-time augmentation vs
evaluation preprocessing."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xfer import engine
from xfer.contract import RunContext
from xfer.data import build_from_ref
from xfer.regimes import REGIMES, run_trial
from xfer.spec import load_spec
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
PAPER_DATASETS = {"food101", "cifar10", "cifar100", "birdsnap", "sun397", "stanford_cars", "fgvc_aircraft",
                  "voc2007", "dtd", "oxford_pets", "caltech101", "flowers102"}


def logspace(a: float, b: float, n: int) -> list[float]:
    return list(np.logspace(math.log10(a), math.log10(b), n))


# ------------------------------------------------------------------ the sweep files' values
@pytest.mark.parametrize("name", ["kornblith2019-public.yaml", "kornblith2019-retrained.yaml"])
def test_paper_sweep_files_hold_the_papers_grids(name):
    spec = load_spec(SWEEPS / name)
    regimes = {r.name: r for r in spec.regimes}
    assert set(regimes) == {"linear_probe", "finetune", "scratch"}
    assert {d.name for d in spec.datasets} == PAPER_DATASETS

    l2 = regimes["linear_probe"].grid["l2"]
    assert l2 == pytest.approx(logspace(1e-6, 1e5, 45), rel=1e-12)

    ft = regimes["finetune"]
    assert ft.grid["lr"] == pytest.approx(logspace(1e-4, 0.1, 7), rel=1e-12)
    assert ft.grid["wd"] == pytest.approx([0.0] + logspace(1e-6, 1e-3, 7), rel=1e-12, abs=0)
    assert ft.options["steps"] == 20000 and ft.options["batch_size"] == 256 and ft.options["wd_over_lr"] is True
    assert ft.options["momentum"] == 0.9

    sc = regimes["scratch"]  # SimCLR App. B.8: 7 lr in [1e-3, 1] x 8 wd in [1e-5, 10^-1.5], 40k steps
    assert sc.grid["lr"] == pytest.approx(logspace(1e-3, 1.0, 7), rel=1e-12)
    assert sc.grid["wd"] == pytest.approx(logspace(1e-5, 10 ** -1.5, 8), rel=1e-12)
    assert sc.options["steps"] == 40000 and sc.options["batch_size"] == 256 and sc.options["wd_over_lr"] is True
    assert len(spec.grid_trials()) == len(spec.models) * 12 * (45 + 56 + 56)


def test_retrained_sweep_pretrains_every_model_with_one_recipe():
    spec = load_spec(SWEEPS / "kornblith2019-retrained.yaml")
    pre = [m for m in spec.models if m.weights == "pretrain"]
    assert len(pre) == len(spec.models) >= 12  # every entry is retrained: none is a hub checkpoint
    recipes = {tuple(sorted((k, v) for k, v in m.pretrain.options.items())) for m in pre}
    assert len(recipes) == 1, "every model is trained with the same recipe"
    from xfer.regimes.pretrain import recipe_lr

    opts = REGIMES.get("pretrain").check_options(pre[0].pretrain.options, "retrained")
    assert opts["batch_size"] == 4096 and recipe_lr(opts) == pytest.approx(0.1 * 4096 / 256)
    assert opts["momentum"] == 0.9 and opts["wd"] == 8e-5 and opts["label_smoothing"] == 0.1
    assert opts["warmup_steps"] > 0 and opts["steps"] > opts["warmup_steps"]
    assert {m.pretrain.dataset.name for m in pre} == {"imagenet"}
    assert spec.resources["pretrain"]["workers"] > 1  # ImageNet-scale source training is data-parallel
    # architectures no library ships are listed in the file, not replaced
    text = (SWEEPS / "kornblith2019-retrained.yaml").read_text()
    for missing in ("Inception v1", "BN-Inception", "NASNet-A Mobile"):
        assert missing in text
    assert not any((m.paper_name or "") in ("Inception v1", "BN-Inception", "NASNet-A Mobile") for m in spec.models)


# ------------------------------------------------------------------ the rules, step by step
def test_a_running_finetune_trial_uses_the_rules_at_every_step(tmp_path, monkeypatch):
    """Record what the optimiser and the batch-norm layers hold when each step is taken."""
    seen: list[dict] = []
    make = engine.make_optimizer

    def recording(model, **kw):
        opt = make(model, **kw)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        step = opt.step

        def step_and_record(*a, **k):
            seen.append({"lr": [g["lr"] for g in opt.param_groups],
                         "wd": [g["weight_decay"] for g in opt.param_groups],
                         "nesterov": [g["nesterov"] for g in opt.param_groups],
                         "momentum": [g["momentum"] for g in opt.param_groups],
                         "bn": {m.momentum for m in bns}, "n_bn": len(bns)})
            return step(*a, **k)

        opt.step = step_and_record
        return opt

    monkeypatch.setattr(engine, "make_optimizer", recording)
    data = DatasetRef("synthetic_near", {"num_classes": 4, "train_per_class": 70, "test_per_class": 5})
    model = ModelSpec(name="m", arch="test_resnet", weights="random", input_size=32)
    # batch 2 makes an epoch long (s > 100 steps), so the rule's 10/s branch is the one in force
    steps, batch, lr, wd = 9, 2, 0.05, 1e-4
    trial = TrialSpec(model=model, dataset=data, regime="finetune", hparams={"lr": lr, "wd": wd},
                      options={"steps": steps, "batch_size": batch, "checkpoint_every": 0}, seed=0, stage="grid",
                      key_rule=REGIMES.get("finetune").key_rule)
    ctx = RunContext.local(tmp_path / "s", tmp_path / "d", work_dir=tmp_path / "w")
    n_train = len(build_from_ref(data, data_root=tmp_path / "d").split("train"))
    r = run_trial(trial, ctx)
    assert r.status == "finished", r.message

    assert len(seen) == steps
    s = n_train // batch
    assert s > 100
    rule_bn = 1.0 - max(1.0 - 10.0 / s, 0.9)  # the paper's TF decay, as torch's momentum
    for t, rec in enumerate(seen):
        want = lr * 0.5 * (1 + math.cos(math.pi * t / steps))  # cosine from lr at step 0 towards 0
        assert rec["lr"] == pytest.approx([want] * len(rec["lr"]), rel=1e-12), t
        assert len(rec["bn"]) == 1 and rec["bn"].pop() == pytest.approx(rule_bn) and rec["n_bn"] > 0, t
        assert rec["wd"] == [pytest.approx(wd / lr), 0.0]  # decay on weights only, divided by the learning rate
        assert all(rec["nesterov"]) and rec["momentum"] == [0.9, 0.9]
    assert seen[0]["lr"][0] == pytest.approx(lr) and seen[-1]["lr"][0] < 0.05 * lr


def test_warmup_then_cosine_schedule():
    lr, total, warm = 1.6, 20, 5
    got = [engine.lr_at(lr, t, total, warm) for t in range(total)]
    assert got[:warm] == pytest.approx([lr * (t + 1) / warm for t in range(warm)])
    assert got[warm] == pytest.approx(lr) and all(a >= b for a, b in zip(got[warm:], got[warm + 1:]))
    assert [engine.lr_at(lr, t, total) for t in range(total)] == [engine.cosine_lr(lr, t, total) for t in range(total)]


def test_bn_momentum_rule_at_its_bounds():
    assert engine.bn_momentum(50) == pytest.approx(0.1)  # max(1 - 10/50, 0.9) = 0.9 -> torch 0.1
    assert engine.bn_momentum(200) == pytest.approx(0.05)  # 1 - 10/200 = 0.95 -> torch 0.05
    assert engine.bn_momentum(5000) == pytest.approx(0.002)


# ------------------------------------------------------------------ augmentation vs evaluation
def _image() -> torch.Tensor:
    """A 3×40×48 uint8 image with a left-right ramp, so crops and flips are visible."""
    x = torch.linspace(0, 255, 48).round().to(torch.uint8)
    img = x.expand(40, 48).clone()
    return torch.stack([img, img.flip(0), torch.full_like(img, 128)])


def test_train_time_augmentation_is_random_resized_crop_and_flip_only():
    from torchvision.transforms import v2

    from xfer.data.transforms import DataConfig, eval_transform, train_transform

    cfg = DataConfig(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)
    kinds = [type(t) for t in train_transform(cfg).transforms]
    geometric = [k for k in kinds if k not in (v2.ToImage, v2.RGB, v2.ToDtype, v2.Normalize, v2.ToPureTensor)]
    assert geometric == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]

    img = _image()
    outs = []
    for seed in range(12):
        torch.manual_seed(seed)
        outs.append(train_transform(cfg)(img))
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) == len(outs)  # random crops
    ramps = [o[0, 16, -1] - o[0, 16, 0] for o in outs]  # the ramp rises left to right unless flipped
    assert any(r > 0 for r in ramps) and any(r < 0 for r in ramps)

    ev = eval_transform(cfg)
    a, b = ev(img), ev(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)  # deterministic
    # resize the short side to floor(32 / 0.875) = 36, centre crop 32, normalise
    ref = v2.functional.center_crop(v2.functional.resize(img, [36], antialias=True), [32, 32])
    ref = (ref.float() / 255 - 0.5) / 0.5
    assert torch.allclose(a, ref, atol=1e-5)
    assert a[0, 16, -1] > a[0, 16, 0]  # never flipped
