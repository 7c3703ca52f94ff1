"""Fine-tuning and training from random initialisation (Kornblith et al. 2019).

``finetune``: the model's weights (hub / file / pretrain), a new head, every layer trained.
``scratch``: the same recipe from timm's random initialisation — whatever the model's ``weights`` say —
with its own, longer default schedule (SimCLR App. B.8 uses 40,000 steps) and its own grid in the sweep.

Both train on ``splits_for(stage).train`` and report the dataset's metric on ``.eval`` once, after
training (``eval_every`` > 0 adds periodic validation in grid trials only: the final stage looks at
test exactly once).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from xfer import engine
from xfer.regimes.base import REGIMES, RunContext, TrialResult, splits_for

log = logging.getLogger(__name__)

FINETUNE_OPTIONS: dict[str, Any] = {
    "steps": 20000,  # the paper's fine-tuning length
    "batch_size": 256,
    "wd_over_lr": True,  # the grid's wd is divided by the learning rate (engine.torch_weight_decay)
    "momentum": 0.9,  # Nesterov
    "checkpoint_every": 1000,  # periodic checkpoints in the trial's work dir (exact resume)
    "eval_every": 0,  # 0: evaluate once, at the end
    "log_every": 50,
}


class FineTune:
    """Train a backbone end to end with a new head; see the module docstring."""

    axes = ("lr", "wd")

    def __init__(self, name: str, options: dict[str, Any], from_scratch: bool) -> None:
        self.name = name
        self.options = dict(options)
        self.from_scratch = from_scratch

    def run(self, trial, ctx: RunContext) -> TrialResult:
        from xfer.data import build_from_ref
        from xfer.models import load_backbone

        t0 = time.perf_counter()
        opts = engine.merge_options(self.options, dict(trial.options), self.name)
        hp = engine.require_hparams(dict(trial.hparams), self.axes, self.name)
        splits = splits_for(trial.stage)
        ds = build_from_ref(trial.dataset, ctx)
        info = ds.info
        model_spec = replace(trial.model, weights="random") if self.from_scratch else trial.model
        backbone = load_backbone(model_spec, num_classes=info.num_classes, ctx=ctx, seed=trial.seed)
        cfg = engine.TrainConfig(steps=int(opts["steps"]), batch_size=int(opts["batch_size"]), lr=hp["lr"],
                                 wd=hp["wd"], wd_over_lr=bool(opts["wd_over_lr"]), momentum=float(opts["momentum"]),
                                 checkpoint_every=int(opts["checkpoint_every"]), log_every=int(opts["log_every"]),
                                 eval_every=int(opts["eval_every"]), seed=trial.seed)
        device = ctx.resolved_device()
        eval_split = ds.split(splits.eval)
        key = f"{splits.prefix}_{info.metric}"

        def periodic(model) -> dict[str, float]:
            value, _, _ = engine.evaluate(model, eval_split, backbone.data_config, info.metric, device=device,
                                          batch_size=cfg.batch_size, num_workers=ctx.num_workers)
            return {key: value}

        if cfg.eval_every and trial.stage != "grid":
            log.info("eval_every ignored in the %s stage: its evaluation split is looked at once", trial.stage)
        outcome = engine.train(backbone.model, ds.split(splits.train), backbone.data_config, cfg, ctx,
                               multilabel=info.multilabel, run_id=trial.key,
                               periodic_eval=periodic if trial.stage == "grid" else None)
        value, scores, targets = engine.evaluate(backbone.model, eval_split, backbone.data_config, info.metric,
                                                 device=device, batch_size=cfg.batch_size,
                                                 num_workers=ctx.num_workers)
        ctx.report(outcome.steps_done, {key: value})
        engine.clear_checkpoint(ctx)
        log.info("%s %s on %s: %s = %.4f (%d steps, %.1fs)", self.name, trial.model.name, trial.dataset.display,
                 key, value, outcome.steps_done, time.perf_counter() - t0)
        return TrialResult(status="finished", metrics={key: value, "train_loss": outcome.last_loss},
                           metric=info.metric, steps_done=outcome.steps_done, scores=scores, targets=targets)


REGIMES.add("finetune", FineTune("finetune", FINETUNE_OPTIONS, from_scratch=False))
REGIMES.add("scratch", FineTune("scratch", {**FINETUNE_OPTIONS, "steps": 40000}, from_scratch=True))
