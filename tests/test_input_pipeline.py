"""The engine's input pipelines (``cached`` | ``pil``): selection and validation, the determinism contract
(step t's batch is a function of (seed, t)), the disk cache shared by the trials of a sweep, and the two
pipelines' statistical equivalence (similar accuracy; their pixels differ by a resampling)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from xfer import engine
from xfer.contract import RunContext
from xfer.data import build_dataset
from xfer.data import cache as C
from xfer.data.transforms import DataConfig
from xfer.options import OptionError
from xfer.regimes import REGIMES, run_trial
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

CFG32 = DataConfig(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_cached_is_the_default_and_unknown_pipelines_name_the_valid_ones():
    assert engine.TrainConfig(steps=1, batch_size=1, lr=0.1).pipeline == "cached"
    assert set(engine.PIPELINES.names()) == {"cached", "pil"}
    with pytest.raises(ValueError, match="cached, pil"):
        engine.TrainConfig(steps=1, batch_size=1, lr=0.1, pipeline="dali")
    ft = REGIMES.get("finetune")
    assert ft.defaults["pipeline"] == "cached"
    with pytest.raises(OptionError, match="pipeline: must be one of cached, pil, got 'fast'"):
        ft.check_options({"pipeline": "fast"}, "regimes.finetune")
    assert REGIMES.get("scratch").check_options({"pipeline": "pil"}, "r")["pipeline"] == "pil"


def test_a_steps_batch_depends_on_seed_and_step_only(tmp_path):
    split = build_dataset("synthetic_near", root=tmp_path).split("train")
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path, device="cpu")
    cfg = engine.TrainConfig(steps=6, batch_size=8, lr=0.1, seed=4)
    whole = list(engine.PIPELINES.get("cached").train(split, CFG32, cfg, ctx, 0, "cpu"))
    late = list(engine.PIPELINES.get("cached").train(split, CFG32, cfg, ctx, 3, "cpu"))
    assert len(whole) == 6 and len(late) == 3
    for (x, y), (x2, y2) in zip(whole[3:], late):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = list(engine.PIPELINES.get("cached").train(split, CFG32, engine.TrainConfig(steps=1, batch_size=8,
                                                                                       lr=0.1, seed=5), ctx, 0, "cpu"))
    assert not torch.equal(other[0][0], whole[0][0])
    # the same indices as the per-sample pipeline: same examples, same order
    targets = torch.cat([y for _, y in whole])
    pil = torch.cat([y for _, y in engine.PIPELINES.get("pil").train(split, CFG32, cfg, ctx, 0, "cpu")])
    assert torch.equal(targets, pil)
    x = whole[0][0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and abs(float(x.mean())) < 3


def _folder(root):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (30 + k, 40, 3), dtype=np.uint8)).save(d / f"{k}.jpg")
    return root


def test_trials_of_a_sweep_share_one_decode(tmp_path, monkeypatch):
    """Two finetune trials (grid: train + val of one pool) and a final one (trainval + test): the train
    pool is decoded once, the test pool once, into the storage's image cache; later trials only map."""
    C.clear_memo()
    calls: list[int] = []
    real = C.decode_into
    monkeypatch.setattr(C, "decode_into", lambda base, images, **kw: calls.append(len(images)) or real(base, images,
                                                                                                       **kw))
    data = DatasetRef("imagefolder", {"path": str(_folder(tmp_path / "imgs"))})
    model = ModelSpec(name="m", arch="test_resnet", weights="random", input_size=32)
    records = []
    for stage, lr in (("grid", 0.01), ("grid", 0.02), ("final", 0.01)):
        trial = TrialSpec(model=model, dataset=data, regime="finetune", hparams={"lr": lr, "wd": 0.0},
                          options={"steps": 2, "batch_size": 4, "log_every": 1}, seed=0, stage=stage)
        C.clear_memo()  # each trial as its own process would
        records.append(run_trial(trial, RunContext.local(storage=tmp_path / "s", data_root=tmp_path, device="cpu")))
    assert [r.status for r in records] == ["finished"] * 3, [r.message for r in records]
    assert sorted(calls) == [4, 12]  # the test pool (2 x 2) and the train pool (2 x 6), once each
    cache_dir = tmp_path / "s" / "image_cache"
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 2


def test_the_pil_pipeline_is_still_there_and_differs_only_numerically(tmp_path):
    split = build_dataset("digits", root=tmp_path).split("train")
    out = {}
    for pipeline in ("cached", "pil"):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10)
        ctx = RunContext.local(storage=tmp_path, data_root=tmp_path, device="cpu")
        engine.train(model, split, CFG32, engine.TrainConfig(steps=2, batch_size=16, lr=0.05, log_every=0,
                                                             pipeline=pipeline), ctx)
        out[pipeline] = model.state_dict()
    diff = [k for k in out["pil"] if out["pil"][k].is_floating_point() and not torch.equal(out["pil"][k],
                                                                                           out["cached"][k])]
    assert diff  # other pixels (one more resampling), so other weights …
    assert all(torch.isfinite(v).all() for v in out["cached"].values())


def test_both_pipelines_reach_similar_accuracy(tmp_path):
    """Statistical equivalence on a real task: the same model, recipe and seeds trained through each
    pipeline reach validation accuracies within a few points of each other (and far above chance)."""
    ds = build_dataset("digits", root=tmp_path)
    acc = {}
    for pipeline in ("cached", "pil"):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10)
        ctx = RunContext.local(storage=tmp_path, data_root=tmp_path, device="cpu")
        engine.train(model, ds.split("train"), CFG32, engine.TrainConfig(steps=60, batch_size=64, lr=0.1,
                                                                         log_every=0, pipeline=pipeline), ctx)
        acc[pipeline], _, _ = engine.evaluate(model, ds.split("val"), CFG32, "top1", pipeline=pipeline)
    assert min(acc.values()) > 0.6, acc  # chance is 0.1
    assert abs(acc["cached"] - acc["pil"]) < 0.08, acc
