"""Metrics against hand-computed cases, sklearn, and a brute-force exact 11-point AP."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from xfer.metrics import IGNORE, METRICS, MetricInputError, compute_metric
from xfer.registry import UnknownNameError


def test_registry_has_the_protocol_metrics():
    assert METRICS.names() == ["map11", "mean_per_class", "top1"]


# ------------------------------------------------------------------ hand-computed cases
def test_top1_by_hand():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    targets = np.array([1, 1, 1, 0])
    # argmax = [1, 0, 1, 0]; correct = [yes, no, yes, yes] → 3/4
    assert compute_metric("top1", scores, targets) == pytest.approx(3 / 4)


def test_mean_per_class_by_hand():
    # 4 score columns, class 3 never appears in targets (it is left out of the mean)
    scores = np.array([
        [5, 1, 0, 0],  # pred 0, true 0 ✓
        [5, 1, 0, 0],  # pred 0, true 0 ✓
        [1, 5, 0, 0],  # pred 1, true 0 ✗
        [1, 5, 0, 0],  # pred 1, true 1 ✓
        [5, 0, 1, 0],  # pred 0, true 2 ✗
        [0, 0, 5, 1],  # pred 2, true 2 ✓
    ], dtype=float)
    targets = np.array([0, 0, 0, 1, 2, 2])
    # recalls: class 0 = 2/3, class 1 = 1/1, class 2 = 1/2 → mean = (2/3 + 1 + 1/2) / 3 = 13/18
    assert compute_metric("mean_per_class", scores, targets) == pytest.approx(13 / 18)
    # while plain top-1 is 4/6
    assert compute_metric("top1", scores, targets) == pytest.approx(4 / 6)


def test_map11_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    s = np.stack([scores, scores, scores], axis=1)
    t = np.zeros((5, 3))
    # class 0: positives at ranks 1 and 3 (P = 2)
    #   rank1 prec 1 rec .5 | rank2 prec 1/2 rec .5 | rank3 prec 2/3 rec 1 | rank4 1/2 | rank5 2/5
    #   t ∈ {0,.1,.2,.3,.4,.5}: best precision at recall ≥ t = 1   (6 thresholds)
    #   t ∈ {.6,.7,.8,.9,1}:    best precision at recall = 1 = 2/3  (5 thresholds)
    #   AP = (6·1 + 5·2/3) / 11 = 28/33
    t[[0, 2], 0] = 1
    # class 1: the only positive is ranked last: precision 1/5 at recall 1 for all 11 thresholds → 1/5
    t[4, 1] = 1
    # class 2: no positives → left out of the mean
    assert compute_metric("map11", s, t) == pytest.approx((28 / 33 + 1 / 5) / 2)


def test_map11_recall_exactly_on_a_threshold_counts():
    # P = 10: three positives first (recall exactly 0.3 at precision 1), then 7 negatives, then 7 positives
    hits = np.array([1] * 3 + [0] * 7 + [1] * 7)
    scores = -np.arange(len(hits), dtype=float)  # already ranked
    # t ∈ {0,.1,.2,.3} → 1 (4 thresholds); t ∈ {.4,…,1} → the best later precision = 10/17 (7 thresholds)
    # AP = (4 + 7·10/17) / 11 = 138/187   (with t = 0.30000000000000004 it would be (3 + 8·10/17)/11)
    got = compute_metric("map11", scores[:, None], hits[:, None])
    assert got == pytest.approx(138 / 187)


def test_map11_ignored_pairs_are_neither_hits_nor_false_positives():
    """The VOC devkit's VOCevalcls: an image whose ground truth for a class is 0 (the class appears in it
    only as "difficult") counts neither as a true nor as a false positive for that class."""
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    s = np.stack([scores, scores[::-1]], axis=1)
    t = np.zeros((5, 2))
    # class 0 ranked 0.9 … 0.5 with labels 1, ignore, 0, 1, 0: the devkit ranks only 1, 0, 1, 0
    #   rank1 prec 1 rec .5 | rank2 prec 1/2 rec .5 | rank3 prec 2/3 rec 1 | rank4 1/2
    #   t ≤ .5 → 1 (6 thresholds), t ≥ .6 → 2/3 (5): AP = (6 + 5·2/3) / 11 = 28/33
    t[:, 0] = [1, IGNORE, 0, 1, 0]
    # class 1 scores the rows in reverse and ignores nothing: row 1 stays in its ranking (per-class masks)
    #   ranked rows 4, 3, 2, 1, 0 with labels 0, 0, 0, 1, 0 → precision 1/4 at recall 1 → AP = 1/4
    t[1, 1] = 1
    assert compute_metric("map11", s, t) == pytest.approx((28 / 33 + 1 / 4) / 2)
    # had the ignored row counted as a hit: P = 3, precisions 1, 1, 2/3, 3/4 → (7·1 + 4·3/4) / 11 = 10/11;
    # as a miss: 1, 1/2, 1/3, 1/2 at recalls .5, .5, .5, 1 → (6·1 + 5·1/2) / 11 = 17/22
    for value, ap in ((1, 10 / 11), (0, 17 / 22)):
        t[1, 0] = value
        assert compute_metric("map11", s[:, :1], t[:, :1]) == pytest.approx(ap)


def test_map11_ignoring_equals_dropping_the_rows():
    rng = np.random.default_rng(5)
    n, c = 60, 4
    targets = (rng.random((n, c)) < 0.3).astype(float)
    targets[0] = 1
    hard = rng.random((n, c)) < 0.15
    scores = rng.normal(size=(n, c)) + targets
    marked = np.where(hard & (targets == 0), IGNORE, targets)
    per_class = [float(_brute_force_ap11(scores[~(marked[:, j] == IGNORE), j], targets[~(marked[:, j] == IGNORE), j]))
                 for j in range(c)]
    assert compute_metric("map11", scores, marked) == pytest.approx(np.mean(per_class), abs=1e-12)
    assert compute_metric("map11", scores, marked) != pytest.approx(compute_metric("map11", scores, targets))


# ------------------------------------------------------------------ against references
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top1_and_mean_per_class_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    targets = rng.integers(0, c, size=n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), targets] += 1.0  # better than chance
    scores[targets == 3] -= 5 * np.eye(c)[3]  # one class much worse: makes the two metrics differ
    pred = scores.argmax(1)
    assert compute_metric("top1", scores, targets) == pytest.approx(accuracy_score(targets, pred))
    assert compute_metric("mean_per_class", scores, targets) == pytest.approx(
        balanced_accuracy_score(targets, pred))
    assert compute_metric("top1", scores, targets) != pytest.approx(
        compute_metric("mean_per_class", scores, targets))


def _brute_force_ap11(scores: np.ndarray, positives: np.ndarray) -> Fraction:
    """Exact rationals: for each threshold k/10, the best precision over all top-m cut-offs whose
    recall is ≥ k/10 (scores are tie-free, so the ranking is unique)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    npos = int(positives.sum())
    cut = []
    for m in range(1, len(order) + 1):
        tp = sum(int(positives[i]) for i in order[:m])
        cut.append((Fraction(tp, npos), Fraction(tp, m)))
    total = Fraction(0)
    for k in range(11):
        ps = [p for r, p in cut if r >= Fraction(k, 10)]
        total += max(ps) if ps else 0
    return total / 11


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map11_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, c = 40, 5
    targets = (rng.random((n, c)) < 0.3).astype(float)
    targets[:, 4] = 0  # a class without positives is left out
    targets[0, 0] = 1  # at least one positive elsewhere
    scores = rng.normal(size=(n, c)) + 0.8 * targets
    present = [j for j in range(c) if targets[:, j].sum() > 0]
    expected = sum(_brute_force_ap11(scores[:, j], targets[:, j]) for j in present) / len(present)
    assert compute_metric("map11", scores, targets) == pytest.approx(float(expected), abs=1e-12)


def test_perfect_and_range():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, size=50)
    assert compute_metric("top1", np.eye(4)[t], t) == 1.0
    assert compute_metric("mean_per_class", np.eye(4)[t], t) == 1.0
    mh = (rng.random((50, 4)) < 0.5).astype(float)
    assert compute_metric("map11", mh, mh) == 1.0
    for name in METRICS:
        tt = mh if name == "map11" else t
        v = compute_metric(name, rng.normal(size=(50, 4)), tt)
        assert 0.0 <= v <= 1.0


# ------------------------------------------------------------------ errors
def test_unknown_metric_lists_valid_names():
    with pytest.raises(UnknownNameError, match="top1") as e:
        compute_metric("top-1", np.zeros((2, 2)), np.array([0, 1]))
    assert "Did you mean 'top1'" in str(e.value)


@pytest.mark.parametrize("name,scores,targets,match", [
    ("top1", np.zeros((3, 2)), np.array([0, 1]), "3 rows but targets have 2"),
    ("top1", np.zeros(3), np.array([0, 1, 1]), r"\[N, C\]"),
    ("top1", np.zeros((3, 2)), np.array([0, 1, 2]), r"\[0, 1\]"),
    ("mean_per_class", np.zeros((2, 2)), np.zeros((2, 2)), "map11"),
    ("top1", np.zeros((2, 2)), np.array([0.5, 1.0]), "integer"),
    ("map11", np.zeros((3, 2)), np.zeros((3, 3)), "shape"),
    ("map11", np.zeros((3, 2)), np.zeros((3, 2)), "no class has a positive"),
    ("map11", np.zeros((2, 2)), np.array([[0, 2], [1, 0]]), "multi-hot"),
    ("map11", np.zeros((2, 2)), np.array([[0, -1], [1, 0]]), "0, 1 or 0.5"),
    ("map11", np.zeros((2, 2)), np.array([[IGNORE, 0], [IGNORE, 0]]), "no class has a positive"),
])
def test_bad_inputs_say_what_is_expected(name, scores, targets, match):
    with pytest.raises(MetricInputError, match=match):
        compute_metric(name, scores, targets)
