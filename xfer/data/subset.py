"""Class-balanced, seeded subsets of a training split: the training-set-size axis of a study.

``per_class`` examples of every class (a class with fewer keeps all of its examples), drawn with one
seeded permutation per class, so that for one seed the subsets are *nested*: the 10-per-class subset
is part of the 25-per-class one. Accuracy against size then measures more data, not other data.
Different seeds draw different subsets; a study's error bars over seeds include that draw.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from xfer.data.splits import per_class_sample
from xfer.hashing import stable_hash

log = logging.getLogger(__name__)

# keeps subset draws apart from the held-out split, which also draws per class from a small seed
SUBSET_STREAM = 7919


def class_balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of each class of ``labels`` (nested in ``per_class``
    for a fixed ``seed``). Raises ValueError for multi-label targets or ``per_class`` < 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("a class-balanced subset needs one class per example; this dataset is multi-label "
                         f"(targets of shape {labels.shape}); use the full training set (train_size 0)")
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"examples per class must be an integer >= 1, got {per_class!r}")
    picked, _ = per_class_sample(labels, int(per_class), seed=SUBSET_STREAM + int(seed))
    return picked


def split_targets(ds: Any, split: str) -> np.ndarray:
    """A split's targets without decoding images where the dataset can say (``SplitDataset.targets``);
    otherwise read them example by example."""
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets(split))
    data = ds.split(split)
    return np.asarray([data[i][1] for i in range(len(data))])


def class_balanced_subset(ds: Any, split: str, per_class: int, seed: int) -> tuple[Dataset, str]:
    """``(subset of ds.split(split), fingerprint of the chosen indices)``; see the module docstring."""
    idx = class_balanced_indices(split_targets(ds, split), per_class, seed)
    log.info("%s: training on %d examples (%d per class, subset seed %d)", split, len(idx), per_class, seed)
    return Subset(ds.split(split), idx.tolist()), stable_hash({"per_class": int(per_class), "seed": int(seed),
                                                                "indices": idx.tolist()})
