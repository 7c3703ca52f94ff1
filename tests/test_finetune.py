"""The training engine's recipe pieces, exact resume, divergence, and the finetune/scratch regimes
end to end on the offline datasets (tiny timm models at 32 px, a few dozen steps)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import Subset

from xfer import engine
from xfer.data import build_dataset
from xfer.data.transforms import DataConfig
from xfer.contract import RunContext
from xfer.regimes import REGIMES, run_trial
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

CFG32 = DataConfig(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)


# ------------------------------------------------------------------ recipe pieces
def test_bn_momentum_rule():
    # TF decay max(1 - 10/s, 0.9) -> torch momentum min(10/s, 0.1)
    assert engine.bn_momentum(1) == 0.1
    assert engine.bn_momentum(100) == pytest.approx(0.1)
    assert engine.bn_momentum(400) == pytest.approx(0.025)
    assert engine.bn_momentum(5000) == pytest.approx(1 - (1 - 10 / 5000))
    with pytest.raises(ValueError):
        engine.bn_momentum(0)
    model = timm.create_model("test_resnet", num_classes=2)
    n = engine.set_bn_momentum(model, 0.025)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert n == len(bns) > 0 and all(m.momentum == 0.025 for m in bns)


def test_cosine_schedule_values():
    assert engine.cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert engine.cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert engine.cosine_lr(0.1, 25, 100) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert engine.cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_is_divided_by_the_learning_rate():
    assert engine.torch_weight_decay(1e-4, 0.01, True) == pytest.approx(1e-2)
    assert engine.torch_weight_decay(1e-4, 0.01, False) == pytest.approx(1e-4)
    # behaviour: with zero gradient and no momentum, one step shrinks weights by (1 - wd) at any lr
    for lr in (1e-3, 0.3):
        lin = torch.nn.Linear(4, 3)
        w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        opt = engine.make_optimizer(lin, lr=lr, wd=1e-2, momentum=0.0, wd_over_lr=True)
        for p in lin.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.allclose(lin.weight, w0 * (1 - 1e-2))
        assert torch.equal(lin.bias, b0)  # biases are not decayed
    opt = engine.make_optimizer(lin, lr=0.1, wd=0.0)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_batch_of_a_step_depends_on_seed_and_step_only():
    a = engine.batch_indices(50, 8, seed=3, step=9)
    assert a == engine.batch_indices(50, 8, seed=3, step=9) != engine.batch_indices(50, 8, seed=4, step=9)
    epoch = [i for t in range(6) for i in engine.batch_indices(50, 8, seed=3, step=t)]
    assert len(set(epoch)) == 48  # one epoch: 6 full batches, no repeats
    late = list(engine._StepBatches(50, 8, 3, start=5, stop=9))
    assert [[k for _, _, k in b] for b in late] == [engine.batch_indices(50, 8, 3, t) for t in range(5, 9)]


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        engine.TrainConfig(steps=0, batch_size=8, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        engine.TrainConfig(steps=1, batch_size=8, lr=-1.0)


# ------------------------------------------------------------------ exact resume
class _Stop(Exception):
    pass


def _train(split, work_dir, report, steps=12):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, drop_rate=0.2)  # dropout: the per-step seed matters
    ctx = RunContext.local(storage=work_dir, data_root=work_dir, work_dir=work_dir, report=report)
    cfg = engine.TrainConfig(steps=steps, batch_size=16, lr=0.05, wd=1e-4, checkpoint_every=4, log_every=3, seed=1)
    return model, engine.train(model, split, CFG32, cfg, ctx, run_id="trial-a")


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    split = Subset(build_dataset("synthetic_near", root=tmp_path).split("train"), range(80))
    plain_reports: list = []
    plain, _ = _train(split, tmp_path / "plain", lambda s, m: plain_reports.append((s, m)))

    def stop_at_6(step, metrics):
        if step == 6:
            raise _Stop

    with pytest.raises(_Stop):
        _train(split, tmp_path / "cut", stop_at_6)
    resumed_reports: list = []
    resumed, outcome = _train(split, tmp_path / "cut", lambda s, m: resumed_reports.append((s, m)))
    assert outcome.resumed_from == 4 and outcome.steps_done == 12
    a, b = plain.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_reports == [r for r in plain_reports if r[0] > 4]  # same losses from step 6 on
    # another run's checkpoint is never resumed
    model = timm.create_model("test_resnet", num_classes=10)
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path, work_dir=tmp_path / "cut")
    out = engine.train(model, split, CFG32, engine.TrainConfig(steps=2, batch_size=16, lr=0.05), ctx, run_id="other")
    assert out.resumed_from == 0


# ------------------------------------------------------------------ regimes end to end
def _trial(model, regime="finetune", dataset="synthetic_near", stage="grid", lr=0.05, wd=1e-5, **options):
    opts = {"steps": 30, "batch_size": 32, "log_every": 10, **options}
    return TrialSpec(model=model, dataset=DatasetRef(dataset), regime=regime, hparams={"lr": lr, "wd": wd},
                     options=opts, seed=0, stage=stage)


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(123)
    path = tmp_path / "source.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    return path


@pytest.fixture
def first_layers(monkeypatch):
    """Record the first conv's weights of every backbone a regime loads (before training)."""
    from xfer import models

    seen: list[torch.Tensor] = []
    real = models.load_backbone

    def spy(*args, **kwargs):
        bb = real(*args, **kwargs)
        seen.append(bb.model.conv1[0].weight.detach().clone())
        return bb

    monkeypatch.setattr(models, "load_backbone", spy)
    return seen


def test_finetune_and_scratch_end_to_end(tmp_path, weights_file, first_layers):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d", work_dir=tmp_path / "w")
    spec = ModelSpec(name="r", arch="test_resnet", weights="file", weights_file=str(weights_file), input_size=32)
    source_conv = torch.load(weights_file)["conv1.0.weight"]
    results = {}
    for regime in ("finetune", "scratch"):
        r = run_trial(_trial(spec, regime), ctx)
        assert r.status == "finished", r.message
        assert 0.0 <= r.metrics["val_top1"] <= 1.0 and math.isfinite(r.metrics["train_loss"])
        assert r.metric == "top1" and r.steps_done == 30
        assert r.scores.shape == (200, 10) and r.targets.shape == (200,)  # synthetic_near's val split
        results[regime] = r
    assert torch.equal(first_layers[0], source_conv)  # finetune starts from the file's weights
    assert not torch.equal(first_layers[1], source_conv)  # scratch ignores them
    assert not np.array_equal(results["finetune"].scores, results["scratch"].scores)
    assert not (tmp_path / "w" / engine.CHECKPOINT_NAME).exists()  # cleared once the result is final


def test_final_stage_reports_test_on_digits(tmp_path):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d")
    spec = ModelSpec(name="r", arch="test_resnet", weights="random", input_size=32)
    seen: list = []
    ctx.report = lambda step, m: seen.append(m)
    r = run_trial(_trial(spec, "scratch", dataset="digits", stage="final", steps=20, eval_every=5), ctx)
    assert r.status == "finished", r.message
    assert set(r.metrics) == {"test_top1", "train_loss"} and 0 <= r.metrics["test_top1"] <= 1
    assert r.scores.shape[0] == 599  # digits' test split
    assert [m for m in seen if "test_top1" in m] == [{"test_top1": r.metrics["test_top1"]}]  # test looked at once


def test_divergence_becomes_a_status(tmp_path):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d")
    spec = ModelSpec(name="r", arch="test_resnet", weights="random", input_size=32)
    r = run_trial(_trial(spec, lr=1e30, wd=0.0, steps=10, batch_size=16), ctx)
    assert r.status == "diverged" and "step" in r.message


def test_bad_options_fail_with_the_valid_names(tmp_path):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d")
    spec = ModelSpec(name="r", arch="test_resnet", weights="random", input_size=32)
    r = run_trial(_trial(spec, stpes=5), ctx)
    assert r.status == "failed" and "stpes" in r.message and "checkpoint_every" in r.message
    r = run_trial(TrialSpec(model=spec, dataset=DatasetRef("digits"), regime="finetune", hparams={"lr": 0.1},
                            options={}), ctx)
    assert r.status == "failed" and "wd" in r.message


def test_regimes_are_registered_with_their_defaults():
    ft, sc = REGIMES.get("finetune"), REGIMES.get("scratch")
    assert ft.axis_names == sc.axis_names == ("lr", "wd", "schedule", "train_size")
    assert ft.defaults["steps"] == 20000 and sc.defaults["steps"] == 40000
    assert ft.defaults["batch_size"] == 256 and ft.defaults["wd_over_lr"] is True and ft.defaults["momentum"] == 0.9


def test_dataloader_workers_give_the_same_run(tmp_path):
    """Augmentation is seeded per (step, sample) inside the dataset, so worker processes change nothing."""
    split = Subset(build_dataset("digits", root=tmp_path).split("train"), range(48))
    finals = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10)
        ctx = RunContext.local(storage=tmp_path, data_root=tmp_path, num_workers=workers)
        engine.train(model, split, CFG32, engine.TrainConfig(steps=3, batch_size=16, lr=0.05, log_every=0), ctx)
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


class _MultiLabel(torch.utils.data.Dataset):
    def __init__(self, n=24, classes=4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.y = (torch.rand(n, classes, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_multilabel_trains_with_bce_and_evaluates_map11(tmp_path):
    assert isinstance(engine.loss_fn(True), torch.nn.BCEWithLogitsLoss)
    assert isinstance(engine.loss_fn(False), torch.nn.CrossEntropyLoss)
    data = _MultiLabel()
    model = timm.create_model("test_resnet", num_classes=4)
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path)
    out = engine.train(model, data, CFG32, engine.TrainConfig(steps=3, batch_size=8, lr=0.01, log_every=1), ctx,
                       multilabel=True)
    assert math.isfinite(out.last_loss)
    value, scores, targets = engine.evaluate(model, data, CFG32, "map11")
    assert 0 <= value <= 1 and scores.shape == targets.shape == (24, 4)
