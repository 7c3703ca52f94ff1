"""Source training: make the checkpoints the other regimes transfer from, and measure source accuracy.

A random-init timm backbone is trained on the source dataset's train+val and its top-1 on the source
test split is recorded as the model's *source accuracy* — the x-axis of the paper's analysis, measured
instead of looked up. The checkpoint lands in ``ctx.checkpoint_dir(trial.key)``:

- ``model.pth``: the state dict (timm format, loadable with ``pretrained_cfg_overlay=dict(file=...)``);
- ``meta.json``: arch, num_classes, the preprocessing (data config) it was trained with, source_top1,
  steps, trial key, and ``complete: true``. It is written last, so its presence marks a finished
  checkpoint; a trial whose checkpoint is complete returns the recorded result without training.

Hyper-parameters are options (there is no grid): ``wd`` here is torch's plain weight decay unless
``wd_over_lr`` is set (source training is ordinary ImageNet-style training, not the transfer grid).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from xfer import engine
from xfer.io import write_atomic
from xfer.regimes.base import REGIMES, RunContext, TrialResult, splits_for

log = logging.getLogger(__name__)

PRETRAIN_OPTIONS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 128,
    "lr": 0.1,
    "wd": 1e-4,
    "wd_over_lr": False,
    "momentum": 0.9,
    "label_smoothing": 0.0,
    "checkpoint_every": 1000,
    "log_every": 50,
}


class Pretrain:
    """Train a random-init backbone on a source dataset; see the module docstring."""

    name = "pretrain"
    axes: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.options = dict(PRETRAIN_OPTIONS)

    def _recorded(self, meta: dict[str, Any], pth: Path) -> TrialResult:
        metrics = {"source_top1": float(meta["source_top1"]), "test_top1": float(meta["source_top1"])}
        if meta.get("train_loss") is not None:
            metrics["train_loss"] = float(meta["train_loss"])
        return TrialResult(status="finished", metrics=metrics, metric="top1", steps_done=int(meta.get("steps", 0)),
                           artifacts={"checkpoint": str(pth)})

    def run(self, trial, ctx: RunContext) -> TrialResult:
        from xfer.data import build_from_ref
        from xfer.models import (CHECKPOINT_FILE, META_FILE, data_config_to_dict, load_backbone, read_meta)

        folder = ctx.checkpoint_dir(trial.key)
        pth, meta_path = folder / CHECKPOINT_FILE, folder / META_FILE
        meta = read_meta(meta_path)
        if meta is not None and pth.is_file():
            log.info("pretrain %s: checkpoint %s exists, not retraining", trial.model.name, folder)
            return self._recorded(meta, pth)

        t0 = time.perf_counter()
        opts = engine.merge_options(self.options, dict(trial.options), self.name)
        if trial.hparams:
            raise ValueError(f"regime 'pretrain' has no grid axes; give steps/lr/wd/... as options, "
                             f"got hparams {dict(trial.hparams)}")
        splits = splits_for("pretrain")
        ds = build_from_ref(trial.dataset, ctx)
        info = ds.info
        if info.multilabel:
            raise ValueError(f"source dataset {info.name!r} is multi-label; source training measures top-1 "
                             "and needs a single-label dataset")
        backbone = load_backbone(replace(trial.model, weights="random"), num_classes=info.num_classes, ctx=ctx,
                                 seed=trial.seed)
        cfg = engine.TrainConfig(steps=int(opts["steps"]), batch_size=int(opts["batch_size"]), lr=float(opts["lr"]),
                                 wd=float(opts["wd"]), wd_over_lr=bool(opts["wd_over_lr"]),
                                 momentum=float(opts["momentum"]), label_smoothing=float(opts["label_smoothing"]),
                                 checkpoint_every=int(opts["checkpoint_every"]), log_every=int(opts["log_every"]),
                                 eval_every=0, seed=trial.seed)
        device = ctx.resolved_device()
        outcome = engine.train(backbone.model, ds.split(splits.train), backbone.data_config, cfg, ctx,
                               run_id=trial.key)
        top1, _, _ = engine.evaluate(backbone.model, ds.split(splits.eval), backbone.data_config, "top1",
                                     device=device, batch_size=cfg.batch_size, num_workers=ctx.num_workers)

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
        write_atomic(pth, lambda p: torch.save(state, p))
        meta = {"arch": trial.model.arch, "num_classes": info.num_classes,
                "data_config": data_config_to_dict(backbone.data_config), "source_top1": top1,
                "source_dataset": trial.dataset.display, "steps": outcome.steps_done,
                "train_loss": outcome.last_loss, "trial_key": trial.key, "seed": trial.seed,
                "options": opts, "complete": True}
        write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
        ctx.report(outcome.steps_done, {"test_top1": top1})
        engine.clear_checkpoint(ctx)
        log.info("pretrain %s on %s: source top-1 %.4f (%d steps, %.1fs) -> %s", trial.model.name,
                 trial.dataset.display, top1, outcome.steps_done, time.perf_counter() - t0, folder)
        return self._recorded(meta, pth)


REGIMES.add("pretrain", Pretrain())
