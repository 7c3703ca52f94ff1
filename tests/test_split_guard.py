"""Selection never sees test: every split a trial reads, recorded where the data comes from.

``SplitDataset.split(name)`` — the class ``xfer.data.build_dataset`` returns for digits and the synthetic
family — is the only door to a dataset's examples (the feature store and the training / evaluation loops
all go through it), so a recorder wrapped around it sees every read. Each test starts from an empty
in-process dataset cache, empty fingerprint memos and a fresh storage folder, so no cached dataset or
cached feature file can stand in for a read.

What is asserted, per transfer regime (linear_probe, finetune, scratch), via ``xfer.regimes.run_trial``:

- ``stage="grid"``: the splits requested are exactly {train, val} — never test, never trainval (which
  contains val and would let training see the selection data); the per-example outputs returned are
  those of ``val`` (targets equal, in order); metrics (returned and reported along the way) are ``val_*``
  only.
- ``stage="final"``: the splits requested are exactly {trainval, test} — so test WAS read, and neither
  ``train`` nor ``val`` was requested at all, hence neither can have been the evaluation split; the
  per-example outputs are those of ``test``; metrics are ``test_*`` only.
- ``pretrain``: reads only the *source* dataset, exactly {trainval, test}; a grid trial transferring
  from that checkpoint reads only its target's {train, val} (never the source, never test).

A self-check shows the recorder catches a leak: with ``splits_for`` of the linear probe swapped for one
that evaluates grid trials on test, the grid assertion fails.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pytest

import xfer.data
import xfer.data.registry
from xfer import features
from xfer.data import build_dataset
from xfer.contract import RunContext
from xfer.regimes import run_trial
from xfer.regimes import linear_probe as linear_probe_module
from xfer.contract import Splits
from xfer.trial import DatasetRef, ModelSpec, PretrainSpec, TrialSpec

MODEL = ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32)
SMALL_SYNTH = {"train_per_class": 20, "test_per_class": 10}
# (dataset, trial options) per regime: small offline data, a few steps
CASES = {
    "linear_probe": (DatasetRef("synthetic_near", options=SMALL_SYNTH), {"max_iter": 50}),
    "finetune": (DatasetRef("digits"),
                 {"steps": 4, "batch_size": 16, "eval_every": 2, "log_every": 1, "checkpoint_every": 0}),
    "scratch": (DatasetRef("synthetic", options={"num_classes": 4, **SMALL_SYNTH}),
                {"steps": 4, "batch_size": 16, "eval_every": 2, "log_every": 1, "checkpoint_every": 0}),
}
HPARAMS = {"linear_probe": {"l2": 1e-2}, "finetune": {"lr": 0.01, "wd": 1e-5}, "scratch": {"lr": 0.01, "wd": 1e-5}}


@dataclass
class Recorder:
    """Every ``split(name)`` call on the patched dataset classes, as (dataset name, split)."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    on: bool = True

    def splits(self, dataset: str | None = None) -> set[str]:
        return {s for d, s in self.calls if dataset is None or d == dataset}

    def datasets(self) -> set[str]:
        return {d for d, _ in self.calls}


@pytest.fixture
def recorder(monkeypatch, tmp_path) -> Recorder:
    rec = Recorder()
    # the concrete classes build_dataset returns for the datasets used here (found, not assumed)
    probe_root = tmp_path / "probe"
    classes = {type(build_dataset("digits", root=probe_root)),
               type(build_dataset("synthetic_near", root=probe_root, **SMALL_SYNTH))}
    for cls in classes:
        original = cls.split

        def split(self, name, _original=original):
            if rec.on:
                rec.calls.append((self.info.name, name))
            return _original(self, name)

        monkeypatch.setattr(cls, "split", split)
    # nothing cached from before (or from the class probe above) may stand in for a read
    monkeypatch.setattr(xfer.data.registry, "_CACHE", OrderedDict())
    features.clear_identity_cache()
    yield rec
    features.clear_identity_cache()


def _ctx(tmp_path, reported: list[dict]) -> RunContext:
    return RunContext.local(storage=tmp_path / "storage", data_root=tmp_path / "data", device="cpu",
                      report=lambda step, m: reported.append(dict(m)))


def _run(regime: str, stage: str, tmp_path, rec: Recorder):
    ref, options = CASES[regime]
    trial = TrialSpec(model=MODEL, dataset=ref, regime=regime, hparams=HPARAMS[regime], options=options,
                      seed=0, stage=stage)
    reported: list[dict] = []
    result = run_trial(trial, _ctx(tmp_path, reported))
    assert result.status == "finished", result.message
    rec.on = False  # what follows is the test's own reading
    ds = build_dataset(ref.name, root=tmp_path / "data", **dict(ref.options))
    return result, reported, ds


def assert_grid_reads(rec: Recorder, result, reported: list[dict], ds) -> None:
    assert "test" not in rec.splits(), f"a grid trial read test: {rec.calls}"
    assert "trainval" not in rec.splits(), f"a grid trial read trainval (contains val): {rec.calls}"
    assert rec.splits() == {"train", "val"}, rec.calls
    np.testing.assert_array_equal(result.targets, ds.targets("val"))  # the evaluated examples are val's
    keys = set(result.metrics).union(*reported)
    assert any(k.startswith("val_") for k in keys) and not any(k.startswith("test_") for k in keys), keys


@pytest.mark.parametrize("regime", ["linear_probe", "finetune", "scratch"])
def test_grid_trials_read_train_and_val_only(regime, tmp_path, recorder):
    result, reported, ds = _run(regime, "grid", tmp_path, recorder)
    assert_grid_reads(recorder, result, reported, ds)
    if regime != "linear_probe":  # eval_every=2 of 4 steps: one periodic validation during training
        assert sum("val_top1" in m for m in reported) == 2, reported


@pytest.mark.parametrize("regime", ["linear_probe", "finetune", "scratch"])
def test_final_trials_train_on_trainval_and_evaluate_test(regime, tmp_path, recorder):
    result, reported, ds = _run(regime, "final", tmp_path, recorder)
    assert "test" in recorder.splits(), recorder.calls
    assert recorder.splits() == {"trainval", "test"}, recorder.calls  # so neither val nor train is evaluated
    np.testing.assert_array_equal(result.targets, ds.targets("test"))
    assert len(result.targets) == ds.counts()["test"] != ds.counts()["val"]
    keys = set(result.metrics).union(*reported)
    assert "test_top1" in result.metrics and not any(k.startswith("val_") for k in keys), keys
    if regime != "linear_probe":  # test is evaluated once, at the end (eval_every is ignored)
        assert sum("test_top1" in m for m in reported) == 1, reported


def test_pretrain_reads_source_trainval_and_test_only(tmp_path, recorder):
    source = DatasetRef("synthetic_source", options={"train_per_class": 5, "test_per_class": 3})
    options = {"steps": 2, "batch_size": 16, "checkpoint_every": 0}
    target, _ = CASES["linear_probe"]
    model = ModelSpec(name="pre", arch="test_resnet", weights="pretrain", input_size=32,
                      pretrain=PretrainSpec(dataset=source, options=options))
    ctx = _ctx(tmp_path, [])
    pre = run_trial(model.pretrain_trial(), ctx)
    assert pre.status == "finished", pre.message
    assert recorder.datasets() == {"synthetic_source"}, recorder.calls
    assert recorder.splits() == {"trainval", "test"}, recorder.calls

    # transferring from that checkpoint: the grid trial reads its target's train/val, never the source
    recorder.calls.clear()
    trial = TrialSpec(model=model, dataset=target, regime="linear_probe", hparams={"l2": 1e-2},
                      options={"max_iter": 50}, stage="grid")
    result = run_trial(trial, ctx)
    assert result.status == "finished", result.message
    assert recorder.datasets() == {"synthetic_near"}, recorder.calls
    assert recorder.splits() == {"train", "val"}, recorder.calls


def test_the_recorder_catches_a_grid_trial_that_reads_test(tmp_path, recorder, monkeypatch):
    """Self-check: were the stage → split rule wrong, the grid assertion above would fail."""
    monkeypatch.setattr(linear_probe_module, "splits_for", lambda stage: Splits("train", "test", "val"))
    result, reported, ds = _run("linear_probe", "grid", tmp_path, recorder)
    assert "test" in recorder.splits()
    with pytest.raises(AssertionError, match="read test"):
        assert_grid_reads(recorder, result, reported, ds)
