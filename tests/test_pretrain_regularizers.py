"""The pretrain regime's regulariser switches do what they say, are validated with errors that list what
is valid, and the report turns a regulariser study into the paper's §4.1 view."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from xfer import engine, models, report_regularizers as regs
from xfer.contract import RunContext
from xfer.options import OptionError
from xfer.regimes import REGIMES, run_trial
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec

SOURCE = DatasetRef("synthetic_source", {"num_classes": 4, "train_per_class": 16, "test_per_class": 6})
BASE = {"steps": 4, "batch_size": 16, "lr": 0.05, "log_every": 2, "checkpoint_every": 0}


def _spec(name="m", **opts):
    return ModelSpec(name=name, arch="test_resnet", weights="pretrain", input_size=32,
                     pretrain=PretrainSpec(dataset=SOURCE, options={**BASE, **opts}))


@pytest.fixture
def ctx(tmp_path):
    return RunContext.local(tmp_path / "s", tmp_path / "d", work_dir=tmp_path / "w")


def test_the_default_is_the_papers_recipe():
    from xfer.regimes.pretrain import recipe_lr

    d = REGIMES.get("pretrain").defaults
    assert (d["batch_size"], recipe_lr(d), d["momentum"], d["wd"]) == (4096, pytest.approx(1.6), 0.9, 8e-5)
    assert recipe_lr({**d, "batch_size": 128}) == pytest.approx(0.05)  # the scaling rule, not 1.6
    assert recipe_lr({**d, "lr": 0.3}) == 0.3
    assert (d["label_smoothing"], d["dropout"], d["bn_scale"], d["aux_head"], d["aux_weight"]) == (
        0.1, 0.2, True, "own", 0.4)


@pytest.mark.parametrize("opts, says", [
    ({"aux_head": "yes"}, "must be one of own, attached, off"),
    ({"dropout": 1.0}, "dropout: must be below 1"),
    ({"label_smoothing": -0.1}, "label_smoothing: must be >= 0"),
    ({"bn_scale": 1}, "expected bool"),
    ({"warmup_steps": 2.5}, "expected integer"),
])
def test_bad_regulariser_settings_say_what_is_valid(opts, says):
    with pytest.raises(OptionError, match=says):
        REGIMES.get("pretrain").check_options(opts, "spec.models[0].pretrain")


def test_regularisers_reach_the_network_and_the_checkpoint_stays_plain(ctx, monkeypatch):
    seen = {}
    train = engine.train

    def spy(model, split, data_config, cfg, c, **kw):
        seen["model"], seen["cfg"] = model, cfg
        return train(model, split, data_config, cfg, c, **kw)

    monkeypatch.setattr(engine, "train", spy)
    spec = _spec(dropout=0.3, bn_scale=False, aux_head="attached", label_smoothing=0.2, warmup_steps=1)
    trial = spec.pretrain_trial()
    r = run_trial(trial, ctx)
    assert r.status == "finished", r.message
    net, cfg = seen["model"], seen["cfg"]
    assert isinstance(net, engine.AuxClassifier) and net.tap is not None
    assert cfg.label_smoothing == 0.2 and cfg.warmup_steps == 1 and cfg.aux_weight == 0.4
    assert net.model.drop_rate == 0.3
    bns = [m for m in net.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and torch.all(m.weight == 1) for m in bns)
    net.train()
    out = net(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 4)
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)

    folder = ctx.layout.checkpoint_dir(trial.key)
    saved = torch.load(folder / "model.pth")
    plain = models.load_backbone(ModelSpec(name="x", arch="test_resnet", weights="random", input_size=32),
                                 num_classes=4).model.state_dict()
    assert saved.keys() == plain.keys()  # no auxiliary tensors: transfer loads the plain network
    gammas = [k for k in saved if k.endswith(".weight") and saved[k].ndim == 1 and not k.startswith("fc")]
    assert gammas and all(torch.all(saved[k] == 1) for k in gammas)  # γ fixed at 1
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["regularizers"] == {"label_smoothing": 0.2, "dropout": 0.3, "bn_scale": False,
                                    "aux_head": "attached", "wd": 8e-5}
    bb = models.load_backbone(spec, num_classes=3, ctx=ctx)  # a transfer regime loads it
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items() if not k.startswith("fc."))


def test_the_auxiliary_loss_is_weighted_in():
    ce = torch.nn.CrossEntropyLoss()
    logits, aux, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert engine._outputs_loss((logits, aux), y, ce, 0.4) == pytest.approx(float(ce(logits, y) + 0.4 * ce(aux, y)))
    assert engine._outputs_loss(logits, y, ce, 0.4) == pytest.approx(float(ce(logits, y)))


def test_inception_v3_uses_its_own_auxiliary_head():
    model = models.load_backbone(ModelSpec(name="i", arch="inception_v3", weights="random"), num_classes=5,
                                 create_kwargs={"aux_logits": True}).model
    net = engine.AuxClassifier(model, 5)
    assert net.head is None and model.AuxLogits is not None
    net.train()
    logits, aux = net(torch.randn(2, 3, 299, 299))
    assert logits.shape == aux.shape == (2, 5)
    assert not any(k.startswith("AuxLogits.") for k in net.backbone_state_dict())


def test_regulariser_view_of_a_results_table():
    settings = {"recipe": {}, "no-ls": {"label_smoothing": 0.0}, "bn-fixed": {"bn_scale": False}}
    specs = [_spec(n, **o) for n, o in settings.items()] + [ModelSpec(name="hub", arch="resnet50")]
    rows = []
    values = {"recipe": (0.80, 0.60, 0.70), "no-ls": (0.79, 0.70, 0.71), "bn-fixed": (0.78, 0.65, 0.69),
              "hub": (0.76, 0.5, 0.6)}
    for model, (src, lp, ft) in values.items():
        for ds, shift in (("a", 0.0), ("b", -0.1)):
            rows.append({"model": model, "dataset": ds, "regime": "linear_probe", "source_top1": src,
                         "metric": "top1", "value": lp + shift})
            rows.append({"model": model, "dataset": ds, "regime": "finetune", "source_top1": src,
                         "metric": "top1", "value": ft + shift})
    results = regs.with_settings(pd.DataFrame(rows), specs)
    assert regs.has_settings(results)
    assert results.loc[results["model"] == "hub", list(regs.COLUMNS)].isna().all().all()
    view = regs.regularizer_table(results)
    assert list(view["setting"]) == [
        "reference: label smoothing 0.1, dropout 0.2, BN scale learned, aux head (own), wd 8e-05",
        "no label smoothing", "BN scale fixed at 1"]
    row = view.set_index("model").loc["no-ls"]
    assert row["source top-1"] == pytest.approx(0.79)
    assert row["linear_probe mean"] == pytest.approx(0.65) and row["finetune mean"] == pytest.approx(0.66)
    want = np.mean([math.log(0.7 / 0.3), math.log(0.6 / 0.4)])
    assert row["linear_probe log-odds"] == pytest.approx(want)
    assert not regs.has_settings(results[results["model"].isin(["recipe", "hub"])])  # one setting: no view


def test_report_gains_the_regulariser_section(tmp_path):
    from xfer.report import build_report

    specs = [_spec("recipe"), _spec("no-dropout", dropout=0.0), _spec("no-aux", aux_head="off")]
    rows = []
    for i, m in enumerate(["recipe", "no-dropout", "no-aux"]):
        for ds in ("a", "b"):
            for regime, v in (("linear_probe", 0.5 + 0.05 * i), ("finetune", 0.7 + 0.01 * i)):
                rows.append({"model": m, "dataset": ds, "regime": regime, "source_top1": 0.6 + 0.01 * i,
                             "metric": "top1", "value": v + (0.02 if ds == "a" else 0.0)})
    results = regs.with_settings(pd.DataFrame(rows), specs)
    made = build_report(results, tmp_path, n_boot=50, n_permutations=10)
    md = (tmp_path / "report.md").read_text()
    assert "Source-training regularisers" in md and "no dropout" in md and "no aux head" in md
    assert made.files["fig_regularizers"].is_file()
    assert "pretrain_dropout" in pd.read_csv(tmp_path / "results.csv").columns
