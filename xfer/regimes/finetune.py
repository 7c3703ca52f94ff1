"""Fine-tuning and training from random initialisation (Kornblith et al. 2019).

``finetune``: the model's weights (hub / file / pretrain), a new head, every layer trained.
``scratch``: the same recipe from timm's random initialisation — whatever the model's ``weights`` say —
with its own, longer default schedule (SimCLR App. B.8 uses 40,000 steps) and its own grid in the sweep.
A scratch trial never loads weights, so its key hashes the architecture and its preprocessing, not the
model entry: model entries of one architecture and preprocessing (e.g. several checkpoints of one
network) share one scratch trial.

Both train on ``splits_for(stage).train`` and report the dataset's metric on ``.eval`` once, after
training (``eval_every`` > 0 adds periodic validation in grid trials only: the final stage looks at
test exactly once).

Two *cell* axes (``Axis(cell=True)``: never selected over, each value its own cell) make the paper's
convergence and data-size views: ``schedule`` multiplies ``steps`` (1×, 2×, 4×: does training from
scratch catch up given longer? He et al. 2018), and ``train_size`` trains on a class-balanced subset of
the training split, ``train_size`` images per class, drawn per seed (``xfer.data.subset``; 0: all).
At their defaults (1, 0) a trial is exactly — and keys exactly as — one without them.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from xfer.contract import Diverged, RunContext, TrialRecord, splits_for
from xfer.options import OptionError
from xfer.regimes.base import REGIMES, TRAIN_SIZE, Axis, Option, Regime, non_negative, positive

if TYPE_CHECKING:
    from xfer.trial import TrialSpec

log = logging.getLogger(__name__)

LR = Axis("lr", "learning rate (cosine-decayed to 0)", valid=positive, rule="> 0", prefer="smaller")
WD = Axis("wd", "weight decay (divided by lr before use when wd_over_lr)", valid=non_negative, rule=">= 0",
          prefer="smaller")
SCHEDULE = Axis("schedule", "schedule length: a multiple of `steps` (cosine decay over the whole of it)",
                valid=lambda v: 0 < v <= 1000, rule="> 0 (a multiple of steps, e.g. 1, 2, 4)", prefer="smaller",
                fmt="g", cell=True, default=1.0)


def schedule_steps(steps: int, schedule: float) -> int:
    """The steps a trial trains for: ``steps`` × ``schedule``, at least one."""
    return max(1, int(round(steps * schedule)))


def _options(steps: int) -> tuple[Option, ...]:
    return (
        Option("steps", steps, "training steps", minimum=1),
        Option("batch_size", 256, "batch size", minimum=1),
        Option("wd_over_lr", True, "divide the grid's wd by the learning rate (the paper's parameterisation)"),
        Option("momentum", 0.9, "Nesterov momentum"),
        Option("pipeline", "cached", "input pipeline: cached (images decoded once, augmented on the trial's "
               "device) or pil (per-sample transforms in DataLoader workers)", choices=("cached", "pil")),
        Option("checkpoint_every", 1000, "periodic checkpoint for exact resume (0: off)", affects_result=False),
        Option("eval_every", 0, "periodic validation in grid trials (0: only at the end)", affects_result=False),
        Option("log_every", 50, "training-loss logging cadence", affects_result=False),
    )


class FineTune(Regime):
    """Train a backbone end to end with a new head; see the module docstring."""

    name = "finetune"
    label = "Fine-tuned"
    axes = (LR, WD, SCHEDULE, TRAIN_SIZE)
    options = _options(20000)  # the paper's fine-tuning length
    from_scratch = False
    early_stopping = True  # periodic validation (eval_every) over a known schedule: ASHA can stop it

    def budget(self, trial: "TrialSpec") -> int:
        opts = {**self.defaults, **trial.options}
        return schedule_steps(int(opts["steps"]), float(trial.hparams.get("schedule", SCHEDULE.default)))

    def run(self, trial: "TrialSpec", ctx: RunContext) -> TrialRecord:
        from xfer import engine
        from xfer.data import build_from_ref
        from xfer.data.subset import class_balanced_subset
        from xfer.models import load_backbone

        opts = self.check_options(trial.options, f"regime {self.name} option")
        hp = self.check_hparams(trial.hparams, f"regime {self.name}")
        splits = splits_for(trial.stage)
        ds = build_from_ref(trial.dataset, data_root=ctx.data_root, download=ctx.download)
        info = ds.info
        model_spec = replace(trial.model, weights="random") if self.from_scratch else trial.model
        backbone = load_backbone(model_spec, num_classes=info.num_classes, ctx=ctx, seed=trial.seed)
        fingerprints = {"data": ds.fingerprint(), "weights": backbone.fingerprint}
        train_split = ds.split(splits.train)
        if hp["train_size"]:
            try:
                train_split, fingerprints["train_subset"] = class_balanced_subset(
                    ds, splits.train, int(hp["train_size"]), seed=trial.seed)
            except ValueError as e:
                raise OptionError(f"regime {self.name}: train_size: {e}") from None
        cfg = engine.TrainConfig(steps=schedule_steps(opts["steps"], hp["schedule"]), batch_size=opts["batch_size"],
                                 lr=hp["lr"], wd=hp["wd"],
                                 wd_over_lr=opts["wd_over_lr"], momentum=opts["momentum"],
                                 checkpoint_every=opts["checkpoint_every"], log_every=opts["log_every"],
                                 eval_every=opts["eval_every"], seed=trial.seed, pipeline=opts["pipeline"])
        device = ctx.resolved_device()
        eval_split = ds.split(splits.eval)
        key = f"{splits.prefix}_{info.metric}"

        def periodic(model) -> dict[str, float]:
            value, _, _ = engine.evaluate(model, eval_split, backbone.data_config, info.metric, device=device,
                                          batch_size=cfg.batch_size, num_workers=ctx.num_workers,
                                          pipeline=cfg.pipeline, cache_dir=ctx.layout.image_cache_dir)
            return {key: value}

        if cfg.eval_every and trial.stage != "grid":
            log.info("eval_every ignored in the %s stage: its evaluation split is looked at once", trial.stage)
        try:
            outcome = engine.train(backbone.model, train_split, backbone.data_config, cfg, ctx,
                                   multilabel=info.multilabel, run_id=trial.key,
                                   periodic_eval=periodic if trial.stage == "grid" else None)
        except Diverged as e:
            return TrialRecord(status="diverged", metric=info.metric, message=str(e), fingerprints=fingerprints)
        value, scores, targets = engine.evaluate(backbone.model, eval_split, backbone.data_config, info.metric,
                                                 device=device, batch_size=cfg.batch_size,
                                                 num_workers=ctx.num_workers, pipeline=cfg.pipeline,
                                                 cache_dir=ctx.layout.image_cache_dir)
        ctx.report(outcome.steps_done, {key: value})
        engine.clear_checkpoint(ctx)
        log.info("%s %s on %s: %s = %.4f (%d steps)", self.name, trial.model.name, trial.dataset.display, key, value,
                 outcome.steps_done)
        metrics = {key: value, "train_loss": outcome.last_loss}
        if outcome.resumed_from:  # a restarted trial (dead worker, killed driver) went on from its checkpoint
            metrics["resumed_from_step"] = float(outcome.resumed_from)
        return TrialRecord(status="finished", metric=info.metric, metrics=metrics,
                           steps_done=outcome.steps_done, fingerprints=fingerprints, scores=scores, targets=targets)


class Scratch(FineTune):
    """The fine-tuning recipe from random initialisation (its own, longer default schedule)."""

    name = "scratch"
    label = "Trained from random initialisation"
    options = _options(40000)  # SimCLR App. B.8
    from_scratch = True
    # no weights are loaded, so none enter the key: the architecture and the preprocessing it is fed with
    model_identity = ("architecture", "preprocessing")


REGIMES.add(FineTune.name, FineTune())
REGIMES.add(Scratch.name, Scratch())
