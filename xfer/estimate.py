"""The ``estimate`` stage: transferability estimators per (model, dataset), from cached frozen features.

Opt-in with ``estimators: [logme, leep, nce, hscore]`` in a sweep file. After the features stage and
before the grid, every (model, dataset) pair of the sweep is scored by each estimator of
``xfer.estimators.ESTIMATORS`` on the target's **trainval** split (the data the grid trains and selects
on; never test), and the scores, each estimator's compute time and the shared costs are logged as one
MLflow run per pair (``xfer.tracking.estimates``). No training happens: features come from the feature
store (computed on a miss, shared with the linear probe), and LEEP/NCE read the **source head's**
predictions — the classifier the weights were trained with (the pretrain regime's source head, or the
ImageNet head of hub weights) applied to the same pooled features. Reruns reuse each pair's run and
compute only the estimators it lacks.

The report's estimator section (``xfer.report_estimators``) then asks how well each estimator — and
plain source top-1 — ranks the models by their fine-tuned and logistic-regression test accuracy.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Sequence

from xfer.contract import RunContext
from xfer.estimators import ESTIMATORS, EstimatorError
from xfer.hashing import stable_hash

if TYPE_CHECKING:
    import numpy as np
    import torch

    from xfer.layout import StorageLayout
    from xfer.spec import SweepSpec
    from xfer.trial import DatasetRef, ModelSpec

log = logging.getLogger(__name__)

SPLIT = "trainval"
# bump when what an estimate *is* changes (split, estimator definitions, source-head rule): old runs go stale
ESTIMATE_PROTOCOL = "1"


class NoSourceHead(ValueError):
    """The model has no source classifier to predict with (random weights, an unusual head)."""


def estimate_key(model: "ModelSpec", ref: "DatasetRef", split: str = SPLIT) -> str:
    """What names a pair's estimate run: the model as the transfer regimes see it (its weights), the
    dataset and the split, and the estimate protocol."""
    return stable_hash({"model": model.key_fields(), "dataset": ref.key_fields(), "split": split,
                        "protocol": ESTIMATE_PROTOCOL}, n=24)


# ------------------------------------------------------------------ the source head
def _source_classes(model: "ModelSpec", ctx: RunContext) -> int:
    from xfer import models

    if model.weights == "random":
        raise NoSourceHead(f"model {model.name!r} has random weights: there is no source head to predict with")
    if model.weights == "pretrain":
        meta = models.read_meta(models.pretrain_checkpoint(model, ctx)[1])
        if meta is None:
            raise models.MissingCheckpointError(f"model {model.name!r}: no pretrain checkpoint yet (the pretrain "
                                                "stage runs before the estimate stage)")
        return int(meta["num_classes"])
    if model.weights == "file":  # the file's own head size, as timm's loader reads it
        loaded = models.WEIGHT_SOURCES.get("file")(model, 0, ctx, models._create_kwargs(model), 0)
        if not loaded.source_classes:
            raise NoSourceHead(f"weights file of {model.name!r} has no classifier")
        return int(loaded.source_classes)
    import timm

    cfg = timm.models.get_pretrained_cfg(model.arch)
    n = int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0
    if not n:
        raise NoSourceHead(f"timm's pretrained config of {model.arch!r} names no classifier size")
    return n


def source_head(model: "ModelSpec", ctx: RunContext) -> tuple["torch.nn.Module", str]:
    """The classifier the model's weights were trained with, as a module that maps the pooled
    penultimate features (what the feature store holds) to source logits, and the weights' fingerprint.

    timm models end in ``forward_head``: pool → pre-logits → classifier; the feature store keeps the
    pre-logits, so the classifier alone finishes the forward pass. That is checked on a random batch
    (a model whose head does more after the pre-logits is refused, not guessed)."""
    import torch

    from xfer import models

    timm_log = logging.getLogger("timm")  # its per-load INFO lines would fill the sweep's output
    level = timm_log.level
    timm_log.setLevel(logging.WARNING)
    try:
        n_src = _source_classes(model, ctx)
        loaded = models.WEIGHT_SOURCES.get(model.weights)(model, n_src, ctx, models._create_kwargs(model), 0)
    finally:
        timm_log.setLevel(level)
    net = loaded.module.eval()
    head = net.get_classifier()
    if not isinstance(head, torch.nn.Module) or getattr(net, "num_classes", n_src) != n_src:
        raise NoSourceHead(f"model {model.name!r}: timm's get_classifier() gave no {n_src}-way source head")
    size = model.input_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        full = net(x)
        pre = net.forward_head(net.forward_features(x), pre_logits=True)
        if pre.ndim != 2 or not torch.allclose(head(pre), full, rtol=1e-4, atol=1e-4):
            raise NoSourceHead(f"model {model.name!r}: its source logits are not the classifier applied to the "
                               "pooled features; LEEP and NCE need that")
    return head, loaded.fingerprint


def source_probabilities(model: "ModelSpec", features: "torch.Tensor", ctx: RunContext,
                         fingerprint: str | None = None) -> "np.ndarray":
    """Softmax of the source head over cached pooled ``features`` [N, D] → [N, Z] (float64).
    ``fingerprint``: the backbone fingerprint the features were made with; a different one is refused."""
    import torch

    head, fp = source_head(model, ctx)
    if fingerprint is not None and fp != fingerprint:
        raise NoSourceHead(f"model {model.name!r}: the cached features were made from weights {fingerprint}, "
                           f"the source head is from {fp}")
    with torch.no_grad():
        logits = torch.cat([head(chunk.float()) for chunk in features.split(4096)])
    return torch.softmax(logits.double(), dim=1).numpy()


# ------------------------------------------------------------------ one pair
@dataclass
class PairEstimate:
    """One (model, dataset) pair's estimates and what they cost."""

    scores: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each estimator on the cached arrays
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it has no score
    source_seconds: float = math.nan  # source-head predictions (shared by LEEP and NCE)
    features_seconds: float = math.nan  # the feature extraction (shared with the linear probe)
    n: int = 0
    dim: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)

    def as_result(self) -> dict[str, Any]:
        return {"scores": self.scores, "seconds": self.seconds, "skipped": self.skipped,
                "source_seconds": self.source_seconds, "features_seconds": self.features_seconds}


def estimate_pair(model: "ModelSpec", ref: "DatasetRef", ctx: RunContext, names: Sequence[str]) -> PairEstimate:
    """Score one pair with the estimators ``names`` on its trainval features. An estimator that cannot
    score it (multi-label target, no source head, degenerate data) is skipped with its reason."""
    from xfer import features

    fs = features.get_feature_set(model, ref, SPLIT, ctx)
    x, y = fs.features.numpy(), fs.targets.numpy()
    out = PairEstimate(n=int(x.shape[0]), dim=int(x.shape[1]),
                       features_seconds=float(fs.meta.get("seconds", math.nan)),
                       fingerprints={"weights": str(fs.meta.get("backbone_fingerprint", "")),
                                     "data": str(fs.meta.get("dataset_fingerprint", ""))})
    ests = {n: ESTIMATORS.get(n) for n in names}
    todo = {}
    for name, est in ests.items():
        why = est.unsupported(fs.multilabel)
        if why:
            out.skipped[name] = why
        else:
            todo[name] = est
    probs = None
    if any("source_probs" in e.needs for e in todo.values()):
        t0 = time.perf_counter()
        try:
            probs = source_probabilities(model, fs.features, ctx, fs.meta.get("backbone_fingerprint"))
            out.source_seconds = time.perf_counter() - t0
        except NoSourceHead as e:
            for name in [n for n, e_ in todo.items() if "source_probs" in e_.needs]:
                out.skipped[name] = str(e)
                del todo[name]
    for name, est in todo.items():
        t0 = time.perf_counter()
        try:
            value = est(features=x, source_probs=probs, targets=y)
        except (EstimatorError, ArithmeticError, ValueError) as e:  # np.linalg.LinAlgError is a ValueError
            out.skipped[name] = f"{type(e).__name__}: {e}"
            continue
        out.seconds[name] = time.perf_counter() - t0
        if math.isfinite(value):
            out.scores[name] = value
        else:
            out.skipped[name] = f"not finite ({value})"
    return out


# ------------------------------------------------------------------ the stage
def run_estimates(spec: "SweepSpec", paths: "StorageLayout", tracker: Any, stream: IO[str] | None = None
                  ) -> tuple[int, int]:
    """Estimate every (model, dataset) pair of ``spec`` that its MLflow run does not already answer for
    every estimator of ``spec.estimators``; log each pair's run (``tracker``: the sweep's
    ``SweepTracker``). Returns (pairs, pairs computed now). Runs in the driver: it reads cached arrays
    and applies one linear head; no training."""
    from xfer.tracking import estimates as est_runs
    from xfer.tracking import is_outage

    names = list(spec.estimators)
    if not names:
        return 0, 0
    out = stream or sys.stdout
    ctx = RunContext(layout=paths, download=spec.download)
    existing = est_runs.by_key(tracker.client, tracker.experiment_id)
    pairs = [(m, d) for m in spec.models for d in spec.datasets]
    todo = []
    for m, d in pairs:
        key = estimate_key(m, d)
        run = existing.get(key)
        missing = [n for n in names if n not in est_runs.names_done(run)]
        if missing:
            todo.append((m, d, key, run, missing))
    print(f"estimate: {len(pairs)} (model, dataset) pairs × {len(names)} estimators ({', '.join(names)}) — "
          f"{len(pairs) - len(todo)} done, {len(todo)} to run", file=out, flush=True)
    for i, (m, d, key, run, missing) in enumerate(todo, 1):
        res = estimate_pair(m, d, ctx, missing)
        shown = ", ".join(f"{n} {v:.4g}" for n, v in res.scores.items())
        skipped = "; ".join(f"{n} skipped ({why})" for n, why in res.skipped.items())
        print(f"[estimate {i}/{len(todo)}] {m.name} / {d.display}: {shown}{'; ' if shown and skipped else ''}"
              f"{skipped}", file=out, flush=True)
        tags = {"xfer.model": m.name, "xfer.dataset": d.display, "xfer.split": SPLIT,
                **{f"xfer.fingerprint.{k}": v for k, v in res.fingerprints.items() if v}}
        params = {"model": m.name, "arch": m.arch, "weights": m.weights, "dataset": d.name, "split": SPLIT,
                  "n": res.n, "dim": res.dim}
        try:
            est_runs.log_estimate(tracker.client, tracker.experiment_id, key=key,
                                  run_id=run.info.run_id if run is not None else None,
                                  parent_run_id=tracker.parent_run_id, tags=tags, params=params,
                                  result=res.as_result())
        except Exception as e:  # noqa: BLE001 - estimates are cheap: an outage loses them, the sweep goes on
            if not is_outage(e):
                raise
            log.warning("estimate %s / %s not logged (tracking server unreachable); the next sweep recomputes it",
                        m.name, d.display)
    return len(pairs), len(todo)
