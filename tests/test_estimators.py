"""Transferability estimators (xfer.estimators): hand-worked values, the invariances each method
claims, and the ordering every estimator must get right (separable classes score above shuffled labels).
The sweep stage and the report section are tested at the end of the file."""
from __future__ import annotations

import math

import numpy as np
import pytest

from xfer.estimators import (ESTIMATORS, EstimatorError, hscore, ledoit_wolf, leep, logme, logme_evidence, nce)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def separable(seed: int = 0, n_per: int = 40, k: int = 4, d: int = 8, sep: float = 3.0):
    """Features whose class means lie ``sep`` apart, labels, and a source head whose softmax leans
    towards one source class per target class (plus noise)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    centres = rng.normal(size=(k, d)) * sep
    f = centres[y] + rng.normal(size=(len(y), d))
    z_of_y = rng.permutation(6)[:k]  # 6 source classes, one favoured per target class
    logits = rng.normal(size=(len(y), 6))
    logits[np.arange(len(y)), z_of_y[y]] += 3.0
    return f, y, softmax(logits)


# ------------------------------------------------------------------ hand-worked cases
def test_nce_hand_worked():
    # z = 0 holds one y=0 and one y=1 (entropy ln 2, weight 1/2); z = 1 holds only y=1 (entropy 0)
    assert nce(np.array([0, 0, 1, 1]), [0, 1, 1, 1]) == pytest.approx(-math.log(2) / 2, abs=1e-12)
    # the same through probabilities (argmax)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    assert nce(probs, [0, 1, 1, 1]) == pytest.approx(-math.log(2) / 2, abs=1e-12)


def test_leep_hand_worked():
    # joint P(y,z) = [[.4,.1],[.1,.4]] → P(y|z) = [[.8,.2],[.2,.8]]; each example: .8·.8 + .2·.2 = .68
    theta = np.array([[0.8, 0.2], [0.2, 0.8]])
    assert leep(theta, [0, 1]) == pytest.approx(math.log(0.68), abs=1e-12)


def test_leep_equals_nce_for_one_hot_source_predictions():
    rng = np.random.default_rng(3)
    z = rng.integers(0, 5, size=60)
    y = (z + rng.integers(0, 2, size=60)) % 3
    assert leep(np.eye(5)[z], y) == pytest.approx(nce(z, y), abs=1e-12)


def test_hscore_hand_worked_one_dimension():
    # var(f) = 5 (f = 0,2,4,6), class means 1 and 5 → var(E[f|y]) = 4 → H = 4/5; in 1-D the
    # Ledoit–Wolf target equals the covariance, so its shrinkage changes nothing (α = 0)
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert hscore(f, [0, 0, 1, 1], shrinkage=False) == pytest.approx(0.8, abs=1e-12)
    assert hscore(f, [0, 0, 1, 1]) == pytest.approx(0.8, abs=1e-12)
    assert ledoit_wolf(f)[1] == 0.0


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    x = np.random.default_rng(1).normal(size=(25, 12)) @ np.random.default_rng(2).normal(size=(12, 12))
    cov, alpha = ledoit_wolf(x)
    sk_cov, sk_alpha = sk_ledoit_wolf(x)
    assert 0 < alpha < 1
    assert alpha == pytest.approx(sk_alpha, rel=1e-10)
    np.testing.assert_allclose(cov, sk_cov, rtol=1e-10, atol=1e-12)


def test_hscore_shrinkage_follows_its_definition():
    f, y, _ = separable(d=30, n_per=5)  # D = 30 > N/2: the plain covariance is badly conditioned
    cov, alpha = ledoit_wolf(f)
    fc = f - f.mean(axis=0)
    g = np.stack([fc[y == c].mean(axis=0) for c in y])  # each example's class mean
    expected = np.trace(np.linalg.inv(cov) @ ((1 - alpha) * (g.T @ g / len(y))))
    assert alpha > 0
    assert hscore(f, y) == pytest.approx(expected, rel=1e-9)


def test_logme_evidence_is_the_maximised_marginal_likelihood():
    from scipy.optimize import minimize
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 4))
    y = f @ rng.normal(size=4) + 0.5 * rng.normal(size=30)

    def loglik(alpha: float, beta: float) -> float:  # y ~ N(0, β⁻¹I + α⁻¹FFᵀ), directly
        return multivariate_normal(np.zeros(30), np.eye(30) / beta + f @ f.T / alpha).logpdf(y) / 30

    ev = logme_evidence(f, y)
    assert ev.value == pytest.approx(loglik(ev.alpha, ev.beta), abs=1e-10)  # the closed form is the likelihood
    best = minimize(lambda p: -loglik(*np.exp(p)), [0.0, 0.0], method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 5000})
    assert ev.value == pytest.approx(-best.fun, abs=1e-8)  # and the fixed point is its maximum
    np.testing.assert_allclose([ev.alpha, ev.beta], np.exp(best.x), rtol=1e-3)


def test_logme_with_more_dimensions_than_examples():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(5)
    f = rng.normal(size=(10, 25))
    y = f[:, 0] + 0.1 * rng.normal(size=10)
    ev = logme_evidence(f, y)
    cov = np.eye(10) / ev.beta + f @ f.T / ev.alpha
    assert ev.value == pytest.approx(multivariate_normal(np.zeros(10), cov).logpdf(y) / 10, abs=1e-9)


def test_logme_averages_one_vs_rest_columns():
    f, y, _ = separable(n_per=10, k=3)
    cols = [logme_evidence(f, (y == c).astype(float)).value for c in range(3)]
    assert logme(f, y) == pytest.approx(np.mean(cols), abs=1e-12)
    # multi-hot targets are scored column by column
    assert logme(f, np.eye(3)[y]) == pytest.approx(np.mean(cols), abs=1e-12)


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_separable_classes_score_higher_than_shuffled_labels(name):
    est = ESTIMATORS.get(name)
    for seed in range(3):
        f, y, probs = separable(seed)
        shuffled = np.random.default_rng(100 + seed).permutation(y)
        good = est(features=f, source_probs=probs, targets=y)
        bad = est(features=f, source_probs=probs, targets=shuffled)
        assert good > bad, (name, seed, good, bad)


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_relabelling_the_target_classes_changes_nothing(name):
    est = ESTIMATORS.get(name)
    f, y, probs = separable(1)
    relabelled = np.array([7, 2, 9, 4])[y]
    assert est(features=f, source_probs=probs, targets=relabelled) == pytest.approx(
        est(features=f, source_probs=probs, targets=y), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["leep", "nce"])
def test_permuting_the_source_classes_changes_nothing(name):
    est = ESTIMATORS.get(name)
    _, y, probs = separable(2)
    perm = np.random.default_rng(0).permutation(probs.shape[1])
    assert est(source_probs=probs[:, perm], targets=y) == pytest.approx(est(source_probs=probs, targets=y), abs=1e-12)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("name", ["logme", "hscore"])
def test_rotating_and_scaling_the_features_changes_nothing(name):
    # LogME: the evidence depends on F only through FFᵀ/α, and α absorbs a scale; the shrunk H-score:
    # Ledoit–Wolf's intensity depends on ‖xₙ‖ and ‖Σ − μI‖_F, both unchanged by a rotation
    est = ESTIMATORS.get(name)
    f, y, _ = separable(4)
    base = est(features=f, targets=y)
    moved = est(features=3.7 * f @ _rotation(f.shape[1], 9), targets=y)
    assert moved == pytest.approx(base, rel=1e-6)


def test_plain_hscore_is_invariant_to_any_invertible_linear_map():
    f, y, _ = separable(5)
    a = np.random.default_rng(8).normal(size=(f.shape[1], f.shape[1])) + 3 * np.eye(f.shape[1])
    assert hscore(f @ a, y, shrinkage=False) == pytest.approx(hscore(f, y, shrinkage=False), rel=1e-8)
    # the shrunk version is not (shrinkage towards μI is not affine-invariant), which is its point
    assert hscore(f @ a, y) != pytest.approx(hscore(f, y), rel=1e-3)


def test_bounds():
    f, y, probs = separable(6)
    h_y = -np.sum(np.bincount(y) / len(y) * np.log(np.bincount(y) / len(y)))
    assert leep(probs, y) <= 0 and nce(probs, y) <= 0
    assert nce(np.zeros(len(y), dtype=int), y) == pytest.approx(-h_y, abs=1e-12)  # Z says nothing about Y
    assert nce(y, y) == 0.0 and leep(np.eye(4)[y], y) == 0.0  # Y is a function of Z
    assert nce(probs, y) >= -h_y - 1e-12


# ------------------------------------------------------------------ registry and errors
def test_registry_declares_what_each_estimator_reads():
    assert ESTIMATORS.names() == ["hscore", "leep", "logme", "nce"]
    for name in ESTIMATORS.names():
        est = ESTIMATORS.get(name)
        assert est.name == name and est.needs and est.reference
    assert ESTIMATORS.get("logme").unsupported(multilabel=True) is None
    assert "multi-label" in ESTIMATORS.get("leep").unsupported(multilabel=True)
    with pytest.raises(EstimatorError, match="needs source_probs"):
        ESTIMATORS.get("leep")(features=np.zeros((3, 2)), targets=[0, 1, 0])


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(EstimatorError, match="rows must sum to 1"):
        leep(np.array([[2.0, 1.0], [0.5, 0.5]]), [0, 1])
    with pytest.raises(EstimatorError, match=r"\[N=2, Z\]"):
        leep(np.array([[1.0, 0.0]]), [0, 1])
    with pytest.raises(EstimatorError, match="multi-label"):
        hscore(np.zeros((3, 2)), np.eye(3))
    with pytest.raises(EstimatorError, match="NaN"):
        logme(np.array([[np.nan], [1.0]]), [0, 1])
    with pytest.raises(EstimatorError, match="integer class ids"):
        nce(np.array([0, 1]), [0.5, 1.0])
