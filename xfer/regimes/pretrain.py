"""Source training: make the checkpoints the other regimes transfer from, and measure source accuracy.

A random-init timm backbone is trained on the source dataset's train+val and its top-1 on the source
test split is recorded as the model's *source accuracy* — the x-axis of the paper's analysis, measured
instead of looked up. The checkpoint lands in ``ctx.layout.checkpoint_dir(trial.key)``:

- ``model.pth``: the state dict (timm format, loadable with ``pretrained_cfg_overlay=dict(file=...)``);
- ``meta.json``: arch, num_classes, the preprocessing (data config) it was trained with, source_top1,
  steps, trial key, the SHA-256 of ``model.pth`` and ``complete: true``. It is written last, so its
  presence marks a finished checkpoint; a trial whose checkpoint is complete and matches its SHA-256
  returns the recorded result without training. A truncated or corrupted ``model.pth`` is logged and
  retrained (the transfer regimes refuse to load one: ``xfer.models``).

Hyper-parameters are options (there is no grid): ``wd`` here is torch's plain weight decay unless
``wd_over_lr`` is set (source training is ordinary ImageNet-style training, not the transfer grid).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xfer.contract import Diverged, RunContext, TrialRecord, splits_for
from xfer.io import save_torch, write_text
from xfer.regimes.base import REGIMES, Option, Regime

if TYPE_CHECKING:
    from xfer.trial import TrialSpec

log = logging.getLogger(__name__)


class Pretrain(Regime):
    """Train a random-init backbone on a source dataset; see the module docstring."""

    name = "pretrain"
    label = "Source training"
    grid = False
    options = (
        Option("steps", 1000, "training steps", minimum=1),
        Option("batch_size", 128, "batch size", minimum=1),
        Option("lr", 0.1, "peak learning rate (cosine decay)"),
        Option("wd", 1e-4, "weight decay (torch's, unless wd_over_lr)"),
        Option("wd_over_lr", False, "divide wd by the learning rate"),
        Option("momentum", 0.9, "Nesterov momentum"),
        Option("label_smoothing", 0.0, "label smoothing of the cross-entropy"),
        Option("checkpoint_every", 1000, "periodic checkpoint for exact resume (0: off)", affects_result=False),
        Option("log_every", 50, "training-loss logging cadence", affects_result=False),
    )

    @staticmethod
    def _recorded(meta: dict[str, Any], pth: Path) -> TrialRecord:
        metrics = {"source_top1": float(meta["source_top1"]), "test_top1": float(meta["source_top1"])}
        if meta.get("train_loss") is not None:
            metrics["train_loss"] = float(meta["train_loss"])
        return TrialRecord(status="finished", metrics=metrics, metric="top1", steps_done=int(meta.get("steps", 0)),
                           fingerprints=dict(meta.get("fingerprints") or {}), artifacts={"checkpoint": str(pth)})

    def run(self, trial: "TrialSpec", ctx: RunContext) -> TrialRecord:
        from xfer import engine
        from xfer.data import build_from_ref
        from xfer.models import (CHECKPOINT_FILE, META_FILE, data_config_to_dict, load_backbone, read_meta,
                                 pretrain_checkpoint_problem)

        folder = ctx.layout.checkpoint_dir(trial.key)
        pth, meta_path = folder / CHECKPOINT_FILE, folder / META_FILE
        meta = read_meta(meta_path)
        if meta is not None and pth.is_file():
            problem = pretrain_checkpoint_problem(folder)
            if problem is None:
                log.info("pretrain %s: checkpoint %s exists, not retraining", trial.model.name, folder)
                return self._recorded(meta, pth)
            log.warning("%s; retraining it", problem)
            meta_path.unlink(missing_ok=True)  # no longer a complete checkpoint until the retrain ends

        opts = self.check_options(trial.options, f"regime {self.name} option")
        self.check_hparams(trial.hparams, f"regime {self.name} (steps/lr/wd/... are options)")
        splits = splits_for("pretrain")
        ds = build_from_ref(trial.dataset, data_root=ctx.data_root, download=ctx.download)
        info = ds.info
        if info.multilabel:
            raise ValueError(f"source dataset {info.name!r} is multi-label; source training measures top-1 "
                             "and needs a single-label dataset")
        backbone = load_backbone(replace(trial.model, weights="random"), num_classes=info.num_classes, ctx=ctx,
                                 seed=trial.seed)
        cfg = engine.TrainConfig(steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"], wd=opts["wd"],
                                 wd_over_lr=opts["wd_over_lr"], momentum=opts["momentum"],
                                 label_smoothing=opts["label_smoothing"], checkpoint_every=opts["checkpoint_every"],
                                 log_every=opts["log_every"], eval_every=0, seed=trial.seed)
        device = ctx.resolved_device()
        try:
            outcome = engine.train(backbone.model, ds.split(splits.train), backbone.data_config, cfg, ctx,
                                   run_id=trial.key)
        except Diverged as e:
            return TrialRecord(status="diverged", metric="top1", message=str(e))
        top1, _, _ = engine.evaluate(backbone.model, ds.split(splits.eval), backbone.data_config, "top1",
                                     device=device, batch_size=cfg.batch_size, num_workers=ctx.num_workers)

        state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
        digest = save_torch(state, pth, checksum=True)
        meta = {"sha256": digest, "arch": trial.model.arch, "num_classes": info.num_classes,
                "data_config": data_config_to_dict(backbone.data_config), "source_top1": top1,
                "source_dataset": trial.dataset.display, "steps": outcome.steps_done,
                "train_loss": outcome.last_loss, "trial_key": trial.key, "seed": trial.seed,
                "fingerprints": {"data": ds.fingerprint()}, "options": opts, "complete": True}
        write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
        ctx.report(outcome.steps_done, {"test_top1": top1})
        engine.clear_checkpoint(ctx)
        log.info("pretrain %s on %s: source top-1 %.4f (%d steps) -> %s", trial.model.name,
                 trial.dataset.display, top1, outcome.steps_done, folder)
        return self._recorded(meta, pth)


REGIMES.add(Pretrain.name, Pretrain())
