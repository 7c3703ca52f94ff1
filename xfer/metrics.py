"""Evaluation metrics of the transfer protocol, as fractions in [0, 1].

Each dataset names its metric (``DatasetInfo.metric``), as in Kornblith et al. 2019:
``top1`` (most datasets), ``mean_per_class`` (Aircraft, Pets, Caltech-101, Flowers: mean of the
per-class recalls, so large classes do not dominate), and ``map11`` (PASCAL VOC 2007: the mean over
classes of the 11-point interpolated average precision of the VOC 2007 devkit).

Every metric takes ``scores`` [N, C] (logits, probabilities or any decision values: only their order
matters) and ``targets`` — [N] class indices for single-label metrics, [N, C] multi-hot for ``map11``
(1 present, 0 absent, ``IGNORE`` neither: see ``map11``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from xfer.registry import Registry

Metric = Callable[[np.ndarray, np.ndarray], float]

# A multi-hot entry that is neither positive nor negative: VOC 2007's "difficult"-only class of an image
# (the class appears in it only in objects marked difficult). ``map11`` leaves such (image, class) pairs
# out of that class's ranking, as the devkit does. 0.5 rather than e.g. -1 so that training on the same
# targets stays a bounded binary cross-entropy (a soft "don't know" target) instead of breaking it.
IGNORE = 0.5

METRICS: "Registry[Metric]" = Registry("metric")


class MetricInputError(ValueError):
    """Scores / targets that do not fit the metric; the message says what was expected."""


def _as_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise MetricInputError(f"scores must be a non-empty [N, C] array, got shape {s.shape}")
    return s


def _class_targets(scores: np.ndarray, targets: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores)
    t = np.asarray(targets)
    if t.ndim != 1:
        raise MetricInputError(f"{name} needs targets of shape [N] (class indices), got shape {t.shape}; "
                               "multi-hot [N, C] targets go with 'map11'")
    if t.shape[0] != s.shape[0]:
        raise MetricInputError(f"{name}: scores have {s.shape[0]} rows but targets have {t.shape[0]}")
    if not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
            raise MetricInputError(f"{name}: targets must be integer class indices")
        t = t.astype(np.int64)
    if t.min() < 0 or t.max() >= s.shape[1]:
        raise MetricInputError(f"{name}: targets must lie in [0, {s.shape[1] - 1}] (scores have "
                               f"{s.shape[1]} columns), got range [{t.min()}, {t.max()}]")
    return s, t


@METRICS.register("top1")
def top1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of examples whose highest score is the true class."""
    s, t = _class_targets(scores, targets, "top1")
    return float(np.mean(np.argmax(s, axis=1) == t))


@METRICS.register("mean_per_class")
def mean_per_class(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of each class's recall (top-1 within the class).
    Classes absent from the evaluated split have no recall and are left out (sklearn's
    ``balanced_accuracy_score`` does the same)."""
    s, t = _class_targets(scores, targets, "mean_per_class")
    correct = np.argmax(s, axis=1) == t
    classes = np.unique(t)
    return float(np.mean([correct[t == c].mean() for c in classes]))


def ap11(scores: np.ndarray, positives: np.ndarray) -> float:
    """11-point interpolated average precision of one class (VOC 2007 devkit ``VOCevaldet``/``VOCevalcls``):
    the mean over recall thresholds t ∈ {0, 0.1, …, 1} of the best precision reached at recall ≥ t
    (0 when recall t is never reached). Examples are ranked by descending score (stable for ties).
    The thresholds are exactly k/10, as the definition says (Everingham et al. 2010): a recall of
    exactly 0.3 counts for t = 0.3. (Ports that use ``np.arange(0, 1.1, 0.1)`` get 0.30000000000000004,
    0.6000000000000001 and 0.7000000000000001 and can miss such a point.)"""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    ap = 0.0
    for k in range(11):
        reached = recall >= k / 10
        ap += precision[reached].max() if reached.any() else 0.0
    return ap / 11


@METRICS.register("map11")
def map11(scores: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label: mean over classes of the 11-point interpolated AP (PASCAL VOC 2007).
    ``targets`` is multi-hot [N, C] with entries 1 (present), 0 (absent) or ``IGNORE``: an ignored
    (image, class) pair is left out of that class's ranking — neither a hit nor a false positive — as
    the devkit's ``VOCevalcls`` does with its ground-truth label 0 (the class appears only as
    "difficult"). Classes without any positive example have no AP and are left out of the mean."""
    s = _as_scores(scores)
    t = np.asarray(targets)
    if t.shape != s.shape:
        raise MetricInputError(f"map11 needs multi-hot targets of the scores' shape {s.shape}, got {t.shape}")
    t = t.astype(np.float64)
    if not np.all((t == 0) | (t == 1) | (t == IGNORE)):
        raise MetricInputError(f"map11: targets must be multi-hot: entries 0, 1 or {IGNORE} (ignored)")
    present = np.flatnonzero((t == 1).sum(axis=0) > 0)
    if len(present) == 0:
        raise MetricInputError("map11: no class has a positive example; AP is undefined")
    aps = []
    for c in present:
        keep = t[:, c] != IGNORE
        aps.append(ap11(s[keep, c], t[keep, c]))
    return float(np.mean(aps))


def compute_metric(name: str, scores: np.ndarray, targets: np.ndarray) -> float:
    """Evaluate a registered metric (``METRICS.names()``) → a fraction in [0, 1]."""
    return METRICS.get(name)(scores, targets)
