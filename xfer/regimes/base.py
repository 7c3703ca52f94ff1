"""The one interface every regime implements, and the stage → split rule.

Regimes are plain PyTorch: nothing here or in a regime module imports Ray or MLflow, so a regime can
be run and tested on its own (``xfer trial``). The Ray trainable and the MLflow callback are thin
adapters around ``run_trial``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from xfer.registry import Registry

if TYPE_CHECKING:
    from xfer.spec import TrialSpec

log = logging.getLogger(__name__)

STATUSES = ("finished", "diverged", "failed")

# name -> Regime instance; each regime module adds itself (REGIMES.add("finetune", FineTune()))
REGIMES: "Registry[Regime]" = Registry("regime")


@dataclass(frozen=True)
class Splits:
    train: str
    eval: str
    prefix: str  # metric name prefix: "val" or "test"


def splits_for(stage: str) -> Splits:
    """Which data a stage may touch. This is the only place that decides it: grid trials never
    see test; the final stage retrains on train+val and evaluates test once; source training
    (pretrain) trains on the source's train+val and reports its test top-1 as *source accuracy*."""
    if stage == "grid":
        return Splits("train", "val", "val")
    if stage in ("final", "pretrain"):
        return Splits("trainval", "test", "test")
    raise ValueError(f"unknown stage {stage!r}; valid: grid, final, pretrain")


Reporter = Callable[[int, dict[str, float]], None]


def _no_report(step: int, metrics: dict[str, float]) -> None:
    return None


@dataclass
class RunContext:
    """Where a trial reads and writes; everything result-changing lives in the TrialSpec instead."""

    storage: Path  # root for checkpoints/<key>/ and features/<key>.pt (shared by all trials)
    data_root: Path  # where datasets live / are downloaded to
    download: bool = False
    device: str = "auto"  # "auto" picks cuda when available
    work_dir: Path | None = None  # per-trial folder for periodic checkpoints (exact resume)
    report: Reporter = _no_report  # per-step metrics (train_loss, val_<metric>) for tracking/progress
    num_workers: int = 0  # DataLoader workers

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def checkpoint_dir(self, key: str) -> Path:
        return Path(self.storage) / "checkpoints" / key

    def features_dir(self) -> Path:
        return Path(self.storage) / "features"


@dataclass
class TrialResult:
    status: str  # one of STATUSES
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. val_top1, train_loss, source_top1
    metric: str = ""  # the dataset's metric name ("top1", "mean_per_class", "map11")
    message: str = ""  # why it diverged / failed
    steps_done: int = 0
    # per-example outputs on the evaluated split (final stage keeps them for significance tests)
    scores: np.ndarray | None = None  # [N, C] logits / decision values
    targets: np.ndarray | None = None  # [N] class ids or [N, C] multi-hot
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path (e.g. pretrain checkpoint)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "metric": self.metric, "message": self.message,
                "steps_done": self.steps_done, **self.metrics}


class Regime(Protocol):
    """A training regime. ``axes`` are its grid's hyper-parameters; ``options`` its other settings
    with defaults (a spec may override them; unknown ones are errors)."""

    name: str
    axes: tuple[str, ...]
    options: dict[str, Any]

    def run(self, trial: "TrialSpec", ctx: RunContext) -> TrialResult: ...


class Diverged(Exception):
    """Raised inside a regime when the loss stops being finite; run_trial turns it into a status."""
