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

**The recipe (defaults).** Kornblith et al. retrained every network with one Inception-style recipe
(their App. A.3), because public checkpoints differ in exactly the regularisers that decide how well
frozen features transfer (§4.1). The defaults are that recipe as this project reads it: SGD with
Nesterov momentum 0.9, batch 4096 at learning rate 1.6 (``lr: 0`` means 0.1 × batch/256) with cosine decay
(``warmup_steps`` of linear warmup before it, 0 by default: set it with the length of the run), weight
decay 8e-5 on weights (not on biases or batch-norm parameters), label smoothing 0.1, dropout 0.2 before
the classifier (TF-slim Inception's keep probability 0.8), the architecture's own auxiliary classifier
with loss weight 0.4 where it has one, and learned batch-norm scales. Length (``steps``) and warmup
are the study's to set (``sweeps/kornblith2019-retrained.yaml``).

**The regulariser switches** (the paper's §4.1 study) are options, so a study pretrains one
architecture under several settings as several model entries:

- ``label_smoothing``: smoothing of the cross-entropy targets (0: off);
- ``dropout``: dropout rate before the classifier (timm ``drop_rate``; 0: off);
- ``bn_scale``: learn the batch-norm scale γ (false: γ fixed at 1, TF-slim's ``scale=False``);
- ``aux_head``: ``own`` — the architecture's auxiliary classifier where it has one (timm's Inception v3),
  nothing elsewhere; ``attached`` — a small auxiliary head on the stride-16 stage of any architecture
  (timm's Inception v4 port dropped TF-slim's); ``off``. The head is trained with weight ``aux_weight``
  and never saved: ``model.pth`` holds the plain network;
- ``wd``: weight decay.

**Data parallel.** A pretrain trial whose ``resources.pretrain`` asks for ``workers`` > 1 runs this
regime on every worker of a Ray Train job (``xfer.distributed``); ``engine.train`` shards each global
batch over the ranks, rank 0 evaluates, writes the one checkpoint and reports. ``batch_size`` is the
global batch (it must divide by the worker count).
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

AUX_CHOICES = ("own", "attached", "off")
# architectures whose timm port has its own auxiliary classifier, and the create_model kwargs that keep it
OWN_AUX_HEADS: dict[str, dict[str, Any]] = {"inception_v3": {"aux_logits": True}}

if TYPE_CHECKING:
    from xfer.trial import TrialSpec

log = logging.getLogger(__name__)


def recipe_lr(opts: dict[str, Any]) -> float:
    """The peak learning rate: the ``lr`` option, or at 0 the recipe's linear scaling rule
    0.1 × batch_size/256 (1.6 at batch 4096), so a smaller batch never inherits a large-batch rate."""
    return float(opts["lr"]) or 0.1 * opts["batch_size"] / 256


class Pretrain(Regime):
    """Train a random-init backbone on a source dataset; see the module docstring."""

    name = "pretrain"
    label = "Source training"
    grid = False
    options = (
        Option("steps", 1000, "training steps", minimum=1),
        Option("batch_size", 4096, "global batch size (over all workers)", minimum=1),
        Option("lr", 0.0, "peak learning rate, cosine-decayed (0: the recipe's 0.1 × batch_size/256)", minimum=0),
        Option("warmup_steps", 0, "linear learning-rate warmup steps before the cosine decay", minimum=0),
        Option("wd", 8e-5, "weight decay (torch's, unless wd_over_lr)", minimum=0),
        Option("wd_over_lr", False, "divide wd by the learning rate"),
        Option("momentum", 0.9, "Nesterov momentum"),
        Option("label_smoothing", 0.1, "label smoothing of the cross-entropy (0: off)", minimum=0, maximum=1),
        Option("dropout", 0.2, "dropout rate before the classifier (0: off)", minimum=0, maximum=1),
        Option("bn_scale", True, "learn batch-norm scales γ (false: fixed at 1)"),
        Option("aux_head", "own", "auxiliary classifier: own (where the architecture has one), attached, off",
               choices=AUX_CHOICES),
        Option("aux_weight", 0.4, "weight of the auxiliary classifier's loss", minimum=0),
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

    @staticmethod
    def _with_regularizers(model: Any, opts: dict[str, Any], own_aux: bool, num_classes: int,
                           seed: int) -> tuple[Any, str | None]:
        """The network as source training runs it: γ frozen at 1 unless ``bn_scale``, wrapped with its
        auxiliary classifier when one is used. Returns (network, which auxiliary head: own | attached | None)."""
        import torch

        from xfer import engine

        if not opts["bn_scale"]:
            engine.fix_bn_scale(model)
        if own_aux:
            return engine.AuxClassifier(model, num_classes), "own"
        if opts["aux_head"] == "attached":
            tap, channels = engine.aux_tap(model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(engine.mix(seed, "aux_head"))
                return engine.AuxClassifier(model, num_classes, tap, channels), "attached"
        return model, None

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
        opts["lr"] = recipe_lr(opts)
        self.check_hparams(trial.hparams, f"regime {self.name} (steps/lr/wd/... are options)")
        splits = splits_for("pretrain")
        ds = build_from_ref(trial.dataset, data_root=ctx.data_root, download=ctx.download)
        info = ds.info
        if info.multilabel:
            raise ValueError(f"source dataset {info.name!r} is multi-label; source training measures top-1 "
                             "and needs a single-label dataset")
        rank, size = engine.world()
        if opts["batch_size"] % size:
            raise ValueError(f"pretrain batch_size {opts['batch_size']} is the global batch and must divide by the "
                             f"{size} workers")
        arch = trial.model.arch.split(".")[0]
        own = OWN_AUX_HEADS.get(arch) if opts["aux_head"] == "own" else None
        kwargs = {**({"drop_rate": opts["dropout"]} if opts["dropout"] > 0 else {}), **(own or {})}
        backbone = load_backbone(replace(trial.model, weights="random"), num_classes=info.num_classes, ctx=ctx,
                                 seed=trial.seed, create_kwargs=kwargs)
        net, aux_used = self._with_regularizers(backbone.model, opts, own is not None, info.num_classes,
                                                trial.seed)
        cfg = engine.TrainConfig(steps=opts["steps"], batch_size=opts["batch_size"], lr=opts["lr"], wd=opts["wd"],
                                 wd_over_lr=opts["wd_over_lr"], momentum=opts["momentum"],
                                 label_smoothing=opts["label_smoothing"], warmup_steps=opts["warmup_steps"],
                                 aux_weight=opts["aux_weight"], checkpoint_every=opts["checkpoint_every"],
                                 log_every=opts["log_every"], eval_every=0, seed=trial.seed)
        device = ctx.resolved_device()
        try:
            outcome = engine.train(net, ds.split(splits.train), backbone.data_config, cfg, ctx, run_id=trial.key)
        except Diverged as e:
            return TrialRecord(status="diverged", metric="top1", message=str(e))
        top1 = float("nan")
        if rank == 0:  # one evaluation, on the plain network (eval mode: no auxiliary output)
            top1, _, _ = engine.evaluate(net, ds.split(splits.eval), backbone.data_config, "top1", device=device,
                                         batch_size=min(cfg.batch_size, 256), num_workers=ctx.num_workers)
        top1 = engine.from_rank0(top1)
        if rank != 0:  # the other workers only helped train; they report what rank 0 does, in step
            ctx.report(outcome.steps_done, {"test_top1": top1})
            return TrialRecord(status="finished", metric="top1", metrics={"source_top1": top1, "test_top1": top1},
                               steps_done=outcome.steps_done)

        plain = net.backbone_state_dict() if isinstance(net, engine.AuxClassifier) else net.state_dict()
        state = {k: v.detach().cpu() for k, v in plain.items()}
        digest = save_torch(state, pth, checksum=True)
        meta = {"sha256": digest, "arch": trial.model.arch, "num_classes": info.num_classes,
                "data_config": data_config_to_dict(backbone.data_config), "source_top1": top1,
                "source_dataset": trial.dataset.display, "steps": outcome.steps_done,
                "train_loss": outcome.last_loss, "trial_key": trial.key, "seed": trial.seed,
                "fingerprints": {"data": ds.fingerprint()}, "options": opts, "workers": size,
                "regularizers": {"label_smoothing": opts["label_smoothing"], "dropout": opts["dropout"],
                                 "bn_scale": opts["bn_scale"], "aux_head": aux_used, "wd": opts["wd"]},
                "complete": True}
        write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
        ctx.report(outcome.steps_done, {"test_top1": top1})
        engine.clear_checkpoint(ctx)
        log.info("pretrain %s on %s: source top-1 %.4f (%d steps) -> %s", trial.model.name,
                 trial.dataset.display, top1, outcome.steps_done, folder)
        return self._recorded(meta, pth)


REGIMES.add(Pretrain.name, Pretrain())
