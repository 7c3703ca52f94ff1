"""The dataset contract shared by every dataset in the registry.

A dataset is built from a name plus options (``build_dataset``) and exposes four splits —
train / val / trainval / test — each a ``torch.utils.data.Dataset`` of ``(image, target)`` where
``image`` is a PIL image or a uint8 CHW tensor and ``target`` is an ``int`` class index
(or, for multi-label data, a float multi-hot tensor of length ``num_classes``).
The split rule is part of the contract (VTAB-style): grid trials train on ``train`` and are
selected on ``val``; the final stage trains on ``trainval`` and evaluates ``test`` once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from torch.utils.data import Dataset

SplitName = Literal["train", "val", "trainval", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "trainval", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a study needs to know about a dataset before it loads a single image."""

    name: str
    num_classes: int
    metric: str  # a name in xfer.metrics.METRICS: "top1" | "mean_per_class" | "map11"
    val_rule: str  # "heldout" (seeded stratified 20% of train) | "official" | "per_class_30"
    multilabel: bool = False
    offline: bool = False  # True when it needs no download (synthetic, digits, user folders)
    description: str = ""


class TransferDataset(Protocol):
    """A dataset with its splits; see the module docstring."""

    info: DatasetInfo

    def split(self, name: SplitName) -> Dataset: ...

    def counts(self) -> dict[str, int]: ...

    def fingerprint(self) -> str:
        """Stable id of the data and split rule (goes into trial and feature keys)."""
        ...

    def class_names(self) -> Sequence[str]: ...
