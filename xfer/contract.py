"""What a regime receives and what it returns: the run context, the split rule and the trial record.

A leaf module (plain Python, numpy only): regimes, the engine, the feature store, the Ray adapter and
the tracker all speak these types, so none of them needs to import another to agree on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from xfer.layout import StorageLayout

STATUSES = ("finished", "diverged", "failed")
RESULT_STATUSES = ("finished", "diverged")  # a diverged trial is a result; a failed one runs again


# The feature store's spatial poolings of a feature map: global average, global max, and both side by side
# (their concatenation, twice as wide). ``features.POOLS`` implements each; the probe's ``pool`` axis names them.
POOLINGS = ("avg", "max", "avgmax")


@dataclass(frozen=True)
class FeatureVariant:
    """Which frozen features a probe reads (Azizpour et al. 2014's factors: depth and pooling).

    ``layer`` 0 is the protocol's feature — the network's own pooled penultimate output, what every key
    before this existed holds; ``layer`` k >= 1 is timm feature stage k (1-based, in ``feature_info``
    order), globally pooled by ``pool``. The default variant keys exactly as features always did.
    """

    layer: int = 0
    pool: str = "avg"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"feature layer must be an integer >= 0 (0: penultimate), got {self.layer!r}")
        if self.pool not in POOLINGS:
            raise ValueError(f"feature pooling must be one of {', '.join(POOLINGS)}, got {self.pool!r}")

    @property
    def is_default(self) -> bool:
        return self == FeatureVariant()

    def describe(self) -> str:
        return f"{'penultimate' if self.layer == 0 else f'stage {self.layer}'}, {self.pool} pooling"


class Diverged(Exception):
    """Raised inside a regime when the loss stops being finite; ``run_trial`` turns it into a status."""


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

    layout: StorageLayout
    download: bool = False
    device: str = "auto"  # "auto" picks cuda when available
    work_dir: Path | None = None  # per-trial folder for periodic checkpoints (exact resume)
    report: Reporter = _no_report  # per-step metrics (train_loss, val_<metric>) for tracking/progress
    num_workers: int = 0  # DataLoader workers
    # torch threads for a CPU trial, pinned because the count changes float results (engine.pinned_threads);
    # None leaves the process's own count, which depends on OMP_NUM_THREADS, Ray and the machine
    threads: int | None = 1

    @staticmethod
    def local(storage: str | Path, data_root: str | Path, **kw: Any) -> "RunContext":
        return RunContext(layout=StorageLayout(Path(storage), Path(data_root)), **kw)

    @property
    def data_root(self) -> Path:
        return self.layout.data_root

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TrialRecord:
    """The outcome of one trial, as the regime made it and as the tracker and selection read it.

    ``metric`` is the dataset's metric name (``top1``, ``mean_per_class``, ``map11``) — a diverged or
    failed record carries it too when it is known. ``metrics`` holds ``val_<metric>`` or
    ``test_<metric>``, ``train_loss`` and, where known, ``source_top1``. ``fingerprints`` identify the
    data and weights the trial actually used (``data``, ``weights``). ``scores``/``targets`` (the
    evaluated split's per-example outputs) stay with the worker: only the final stage saves them.
    """

    status: str  # one of STATUSES
    metric: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""  # why it diverged / failed, or a note (e.g. L-BFGS stopped on its budget)
    steps_done: int = 0
    seconds: float = 0.0
    fingerprints: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path (checkpoint, predictions)
    scores: Any = None  # [N, C] logits / decision values (numpy)
    targets: Any = None  # [N] class ids or [N, C] multi-hot (numpy)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown trial status {self.status!r}; valid: {', '.join(STATUSES)}")

    @property
    def is_result(self) -> bool:
        return self.status in RESULT_STATUSES

    def objective(self) -> float | None:
        """The validation value a searcher maximises (None unless finished with a finite val)."""
        v = self.metrics.get(f"val_{self.metric}") if self.status == "finished" else None
        return float(v) if v is not None and math.isfinite(v) else None

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-example arrays: what crosses from a worker to the driver."""
        return {"status": self.status, "metric": self.metric, "metrics": dict(self.metrics),
                "message": self.message, "steps_done": int(self.steps_done), "seconds": float(self.seconds),
                "fingerprints": dict(self.fingerprints), "artifacts": dict(self.artifacts)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "TrialRecord":
        return TrialRecord(status=str(d.get("status") or "failed"), metric=str(d.get("metric") or ""),
                           metrics={k: float(v) for k, v in (d.get("metrics") or {}).items()},
                           message=str(d.get("message") or ""), steps_done=int(d.get("steps_done") or 0),
                           seconds=float(d.get("seconds") or 0.0), fingerprints=dict(d.get("fingerprints") or {}),
                           artifacts=dict(d.get("artifacts") or {}))
