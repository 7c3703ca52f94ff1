"""Split rules and the one concrete ``TransferDataset`` every registered dataset is assembled into.

A dataset is a few *pools* (the files or arrays as they come: e.g. CIFAR's train and test batches)
and, per split, which indices of which pool belong to it. Keeping that provenance explicit is what
lets a test check the contract (train ∪ val = trainval, test disjoint) for every dataset alike, and
lets one fingerprint cover the data *and* the split rule.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from xfer.data.base import SPLITS, DatasetInfo, SplitName
from xfer.hashing import stable_hash

log = logging.getLogger(__name__)

# bump when a split rule or a generator changes, so old fingerprints (and cached features) go stale
SPLIT_PROTOCOL = "1"


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"split rules need one integer label per example (got an array of shape {arr.shape}); "
                         "multi-label datasets use official splits")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _shuffled_by_class(y: np.ndarray, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """Each class's example indices in a seeded random order (one generator, classes in label order)."""
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        yield int(c), idx[rng.permutation(idx.size)]


def _sorted_cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def stratified_holdout(labels: Sequence[int] | np.ndarray, fraction: float = 0.2,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (train, val), ``fraction`` of each class going to val.

    Deterministic in ``seed``; per class ``round(fraction * n)`` examples go to val, but every class
    keeps at least one training example (a class seen only in val could never be predicted).
    Both index arrays are sorted.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction!r}")
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for _, idx in _shuffled_by_class(_as_labels(labels), seed):
        n_val = min(int(round(fraction * idx.size)), idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return _sorted_cat(train), _sorted_cat(val)


def per_class_sample(labels: Sequence[int] | np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` random examples per class; returns (picked, rest), both sorted.

    Caltech-101's protocol ("30 random images per class for training, the rest for testing").
    A class with at most ``k`` examples is picked whole (and logged: it has no test examples).
    """
    if int(k) != k or k < 1:
        raise ValueError(f"examples per class must be an integer >= 1, got {k!r}")
    picked: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for c, idx in _shuffled_by_class(_as_labels(labels), seed):
        if idx.size <= k:
            log.warning("class %s has only %d examples (<= %d): all of them are picked, none left over",
                        c, idx.size, k)
        picked.append(idx[:k])
        rest.append(idx[k:])
    return _sorted_cat(picked), _sorted_cat(rest)


class ArrayPool(Dataset):
    """Images held in memory as one uint8 ``[N, C, H, W]`` tensor (CIFAR, synthetic, digits)."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = np.asarray(targets)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


@dataclass(frozen=True)
class Part:
    """Some examples of one pool: ``pools[pool][indices]``."""

    pool: str
    indices: np.ndarray


class Selection(Dataset):
    """The concatenation of a few pool parts; what ``split(name)`` returns.

    ``identity`` is the owning dataset's fingerprint: with it a pool's decoded images can be cached
    on disk under a key of what they are (``xfer.data.cache``)."""

    def __init__(self, pools: Mapping[str, Dataset], parts: Sequence[Part], identity: str | None = None) -> None:
        self.pools = pools
        self.identity = identity
        self.parts = [p for p in parts if len(p.indices)]
        self._ends = np.cumsum([len(p.indices) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a split of {n} examples")
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        part = self.parts[k]
        return self.pools[part.pool][int(part.indices[i - start])]


class SplitDataset:
    """A ``TransferDataset`` made of pools and per-split parts (see the module docstring).

    ``trainval`` is always train followed by val; ``fingerprint`` hashes ``identity`` (what the data
    is: name, generator params or file listing, non-path options), the split rule and the counts.
    """

    def __init__(self, info: DatasetInfo, pools: Mapping[str, Dataset], parts: Mapping[str, Sequence[Part]],
                 class_names: Sequence[str], identity: Mapping[str, Any]) -> None:
        missing = [s for s in ("train", "val", "test") if s not in parts]
        if missing:
            raise ValueError(f"dataset {info.name!r} defines no {', '.join(missing)} split")
        self.info = info
        self._pools = dict(pools)
        self._parts: dict[str, list[Part]] = {s: list(parts[s]) for s in ("train", "val", "test")}
        self._parts["trainval"] = self._parts["train"] + self._parts["val"]
        self._class_names = list(class_names)
        self._identity = dict(identity)
        self._splits: dict[str, Selection] = {}

    def split(self, name: SplitName) -> Dataset:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        if name not in self._splits:
            self._splits[name] = Selection(self._pools, self._parts[name], identity=self.fingerprint())
        return self._splits[name]

    def parts(self, name: SplitName) -> list[tuple[str, np.ndarray]]:
        """(pool name, indices) making up a split — provenance for tests and debugging."""
        self.split(name)
        return [(p.pool, p.indices) for p in self._parts[name]]

    def targets(self, name: SplitName) -> np.ndarray:
        """All targets of a split without loading images (``[N]`` ints or ``[N, C]`` multi-hot)."""
        self.split(name)  # validates the name
        out = []
        for p in self._parts[name]:
            out.append(np.asarray(getattr(self._pools[p.pool], "targets"))[p.indices])
        shape = (0, self.info.num_classes) if self.info.multilabel else (0,)
        return np.concatenate(out) if out else np.zeros(shape, np.int64)

    def counts(self) -> dict[str, int]:
        return {s: int(sum(len(p.indices) for p in self._parts[s])) for s in SPLITS}

    def class_names(self) -> list[str]:
        return list(self._class_names)

    def fingerprint(self) -> str:
        return stable_hash({"protocol": SPLIT_PROTOCOL, "name": self.info.name, "val_rule": self.info.val_rule,
                          "identity": self._identity, "counts": self.counts()})

    def __repr__(self) -> str:
        c = self.counts()
        return (f"SplitDataset({self.info.name!r}, classes={self.info.num_classes}, "
                + ", ".join(f"{k}={v}" for k, v in c.items()) + ")")


def heldout_parts(train_labels: np.ndarray, fraction: float, seed: int,
                  pool: str = "train") -> tuple[Part, Part]:
    """The held-out validation rule: a seeded stratified ``fraction`` of ``pool`` becomes val."""
    tr, va = stratified_holdout(train_labels, fraction, seed)
    return Part(pool, tr), Part(pool, va)
