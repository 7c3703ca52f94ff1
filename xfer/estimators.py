"""Transferability estimators: how well a frozen model should transfer to a target, scored without training.

Each estimator is a pure function of arrays (numpy only) and is registered in ``ESTIMATORS`` with a
descriptor that says what it reads — the frozen penultimate ``features`` [N, D], the source head's
``source_probs`` [N, Z] (softmax over the source classes) — and whether it is defined for multi-label
targets. Higher is better for all of them (each is an estimate of transfer performance).

- ``logme`` (You et al. 2021): the log marginal likelihood (evidence) of the labels under Bayesian
  linear regression on the features, maximised over the prior precision α and noise precision β by
  MacKay's fixed-point iteration on the SVD of F, divided by N and averaged over one-vs-rest targets.
- ``leep`` (Nguyen et al. 2020): the mean log-likelihood of the target labels under the "dummy"
  classifier that maps the source head's softmax θ(x) through the empirical P̂(y | z).
- ``nce`` (Tran et al. 2019): the negative conditional entropy −H(Y | Z) with Z = argmax of the source head.
- ``hscore`` (Bao et al. 2019, with the Ledoit–Wolf shrinkage of Ibrahim et al. 2022):
  tr(Σ_f^{-1} Σ_{E[f|y]}); the shrunk covariance (1 − α)Σ_f + α·tr(Σ_f)/D·I keeps the inverse stable when
  D is large next to N, and the between-class covariance is scaled by (1 − α) to match.

Why pure functions: they are checked on hand-worked cases and on the invariances their papers claim
(``tests/test_estimators.py``), and the sweep's ``estimate`` stage (``xfer.estimate``) only feeds them
cached arrays and times them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from xfer.registry import Registry


class EstimatorError(ValueError):
    """Inputs an estimator cannot score; the message says what was wrong and what is expected."""


# ------------------------------------------------------------------ input checks
def _features(features: Any, n: int | None = None) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise EstimatorError(f"features must be a 2-D array [N >= 2, D >= 1], got shape {f.shape}")
    if n is not None and f.shape[0] != n:
        raise EstimatorError(f"features have {f.shape[0]} rows but there are {n} targets")
    if not np.isfinite(f).all():
        raise EstimatorError("features contain NaN or infinite values")
    return f


def _labels(targets: Any) -> np.ndarray:
    """Single-label class ids as a 1-D int array (any integer values; only equality matters)."""
    y = np.asarray(targets)
    if y.ndim != 1:
        raise EstimatorError(f"targets must be 1-D class ids for this estimator, got shape {y.shape} "
                             "(multi-hot targets are multi-label: not defined here)")
    if y.shape[0] < 2:
        raise EstimatorError(f"need at least 2 examples, got {y.shape[0]}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise EstimatorError("targets must be integer class ids")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise EstimatorError(f"targets must be integer class ids, got dtype {y.dtype}")
    return y


def _index(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Class ids → 0..K-1 (classes absent from the sample get no column)."""
    classes, idx = np.unique(y, return_inverse=True)
    return idx.reshape(-1), len(classes)


def _probs(source_probs: Any, n: int) -> np.ndarray:
    p = np.asarray(source_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 1:
        raise EstimatorError(f"source_probs must be [N={n}, Z] (the source head's softmax), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise EstimatorError("source_probs must be finite and non-negative (a softmax over the source classes)")
    sums = p.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise EstimatorError(f"source_probs rows must sum to 1 (a softmax), found sums in "
                             f"[{sums.min():.4g}, {sums.max():.4g}]; apply softmax to the logits first")
    return p / sums[:, None]


# ------------------------------------------------------------------ LogME
@dataclass(frozen=True)
class Evidence:
    """One target column's LogME fit: evidence / N at the fixed point, and the precisions found."""

    value: float
    alpha: float
    beta: float
    iterations: int


def _evidence_terms(n: int, d: int, s2: np.ndarray, u: np.ndarray, yy: float, alpha: float, beta: float
                    ) -> tuple[float, float, float, np.ndarray]:
    """(log evidence, ‖m‖², ‖y − Fm‖², γ terms) at (α, β), all from the thin SVD F = U S Vᵀ:
    u = Uᵀy, s2 = S², yy = ‖y‖². The posterior mean is m = V diag(β s/(α + β s²)) u."""
    shrink = beta * s2 / (alpha + beta * s2)  # per component; γ = its sum
    mm = float(np.sum((np.sqrt(s2) * beta * u / (alpha + beta * s2)) ** 2))
    res = max(yy - float(u @ u), 0.0) + float(np.sum(((1.0 - shrink) * u) ** 2))
    r = len(s2)
    logdet = float(np.sum(np.log(alpha + beta * s2))) + (d - r) * math.log(alpha)
    ev = (0.5 * n * math.log(beta) + 0.5 * d * math.log(alpha) - 0.5 * n * math.log(2 * math.pi)
          - 0.5 * beta * res - 0.5 * alpha * mm - 0.5 * logdet)
    return ev, mm, res, shrink


def logme_evidence(features: Any, y: Any, *, tol: float = 1e-7, max_iter: int = 500,
                   svd: tuple[np.ndarray, np.ndarray] | None = None) -> Evidence:
    """Maximum evidence / N of a real target vector ``y`` [N] under y = Fw + ε, w ~ N(0, α⁻¹I),
    ε ~ N(0, β⁻¹I), by MacKay's fixed point (γ = Σ βσ²/(α+βσ²), α = γ/‖m‖², β = (N−γ)/‖y−Fm‖²).
    ``svd``: (U, S) of F, to share one decomposition between target columns."""
    f = _features(features)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n, d = f.shape
    if y.shape[0] != n:
        raise EstimatorError(f"y has {y.shape[0]} entries, features {n} rows")
    U, S = svd if svd is not None else np.linalg.svd(f, full_matrices=False)[:2]
    s2 = S ** 2
    u = U.T @ y
    yy = float(y @ y)
    tiny = np.finfo(np.float64).tiny
    alpha, beta = 1.0, 1.0
    it = 0
    for it in range(1, max_iter + 1):
        _, mm, res, shrink = _evidence_terms(n, d, s2, u, yy, alpha, beta)
        gamma = float(np.sum(shrink))
        new_alpha = max(gamma, tiny) / max(mm, tiny)
        new_beta = max(n - gamma, tiny) / max(res, tiny)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    ev = _evidence_terms(n, d, s2, u, yy, alpha, beta)[0]
    return Evidence(value=ev / n, alpha=alpha, beta=beta, iterations=it)


def logme(features: Any, targets: Any, **kw: Any) -> float:
    """LogME: mean over target columns of the maximum evidence / N. Single-label targets become one
    one-vs-rest indicator column per class present; multi-hot targets [N, C] are used as they are."""
    t = np.asarray(targets)
    if t.ndim == 2:  # multi-label: one regression per label column
        cols = t.astype(np.float64)
        if not np.isfinite(cols).all():
            raise EstimatorError("multi-hot targets contain NaN or infinite values")
        f = _features(features, t.shape[0])
    else:
        idx, k = _index(_labels(t))
        f = _features(features, idx.shape[0])
        cols = np.eye(k)[idx]
    U, S = np.linalg.svd(f, full_matrices=False)[:2]
    return float(np.mean([logme_evidence(f, cols[:, j], svd=(U, S), **kw).value for j in range(cols.shape[1])]))


# ------------------------------------------------------------------ LEEP and NCE
def leep(source_probs: Any, targets: Any) -> float:
    """LEEP = (1/N) Σᵢ log Σ_z P̂(yᵢ | z) θ(xᵢ)_z with P̂(y, z) = (1/N) Σ_{i: yᵢ = y} θ(xᵢ)_z (the soft joint
    of target label and source class) and P̂(y | z) = P̂(y, z) / P̂(z). At most 0; 0 when the source head
    already separates the target classes with certainty."""
    idx, k = _index(_labels(targets))
    theta = _probs(source_probs, idx.shape[0])
    n = idx.shape[0]
    joint = np.zeros((k, theta.shape[1]))
    np.add.at(joint, idx, theta)
    joint /= n
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P̂(y | z); unused z: never weighted
    eep = np.einsum("nz,nz->n", theta, cond[idx])  # Σ_z P̂(yᵢ | z) θ(xᵢ)_z
    return float(np.mean(np.log(np.maximum(eep, np.finfo(np.float64).tiny))))


def nce(source: Any, targets: Any) -> float:
    """NCE = −H(Y | Z) = Σ_{y,z} P̄(y, z) log P̄(y | z) on the empirical joint of target labels and the
    source head's hard labels Z (``source``: [N, Z] probabilities or logits → argmax, or [N] ids).
    Between −H(Y) (Z says nothing about Y) and 0 (Y is a function of Z)."""
    idx, k = _index(_labels(targets))
    s = np.asarray(source)
    if s.ndim == 2:
        if s.shape[0] != idx.shape[0]:
            raise EstimatorError(f"source has {s.shape[0]} rows, targets {idx.shape[0]}")
        z = np.argmax(s, axis=1)
    else:
        z = _labels(s)
        if z.shape[0] != idx.shape[0]:
            raise EstimatorError(f"source labels have {z.shape[0]} entries, targets {idx.shape[0]}")
    zi, m = _index(z)
    joint = np.zeros((k, m))
    np.add.at(joint, (idx, zi), 1.0)
    joint /= idx.shape[0]
    pz = joint.sum(axis=0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / pz)[nz])))


# ------------------------------------------------------------------ H-score
def ledoit_wolf(x: Any) -> tuple[np.ndarray, float]:
    """Ledoit–Wolf shrinkage of the (biased) covariance of ``x`` [N, D] towards μI, μ = tr(Σ)/D:
    returns ((1 − α)Σ + αμI, α), α ∈ [0, 1] the asymptotically optimal intensity (Ledoit & Wolf 2004)."""
    x = _features(x)
    x = x - x.mean(axis=0)
    n, d = x.shape
    cov = x.T @ x / n
    mu = float(np.trace(cov)) / d
    x2 = x ** 2
    # Σᵢ,ⱼ (x²ᵀx²)ᵢⱼ = Σₙ ‖xₙ‖⁴: the variance of the sample covariance's entries
    beta_ = float(np.sum(np.sum(x2, axis=1) ** 2))
    delta_ = float(np.sum(cov ** 2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(cov)) + d * mu ** 2) / d
    beta = min(beta, delta)
    alpha = 0.0 if beta <= 0 or delta <= 0 else beta / delta
    shrunk = (1.0 - alpha) * cov
    shrunk[np.diag_indices(d)] += alpha * mu
    return shrunk, float(alpha)


def hscore(features: Any, targets: Any, *, shrinkage: bool = True) -> float:
    """H-score tr(Σ_f⁻¹ Σ_g), g = E[f | y] (each example replaced by its class mean): how much of the
    feature variance is between classes. ``shrinkage=True`` (the registered ``hscore``) uses the
    Ledoit–Wolf covariance and (1 − α)Σ_g (Ibrahim et al. 2022); ``False`` is Bao et al.'s original
    with a pseudo-inverse, invariant to any invertible linear map of the features."""
    idx, k = _index(_labels(targets))
    f = _features(features, idx.shape[0])
    f = f - f.mean(axis=0)
    n, d = f.shape
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    means = np.zeros((k, d))
    np.add.at(means, idx, f)
    means /= counts[:, None]
    cov_g = (means * (counts / n)[:, None]).T @ means  # Σ_k p_k μ_k μ_kᵀ (the μ_k average to 0)
    if shrinkage:
        cov_f, alpha = ledoit_wolf(f)
        cov_g = (1.0 - alpha) * cov_g
    else:
        cov_f = f.T @ f / n
    inv = np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True)
    return float(np.sum(inv * cov_g))  # tr(A B) for symmetric A, B


# ------------------------------------------------------------------ registry
INPUTS = ("features", "source_probs")


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function, what it reads (``needs``: of ``INPUTS``), whether it is
    defined for multi-label targets, and where it comes from. Call it with keyword arrays."""

    name: str
    fn: Callable[..., float]
    needs: tuple[str, ...]
    multilabel: bool
    reference: str

    def unsupported(self, multilabel: bool) -> str | None:
        """Why this estimator cannot score such a target, or None."""
        if multilabel and not self.multilabel:
            return f"{self.name} is not defined for multi-label targets"
        return None

    def __call__(self, *, targets: Any, features: Any = None, source_probs: Any = None) -> float:
        given = {"features": features, "source_probs": source_probs}
        missing = [k for k in self.needs if given[k] is None]
        if missing:
            raise EstimatorError(f"estimator {self.name!r} needs {', '.join(missing)}")
        return float(self.fn(*(given[k] for k in self.needs), targets))


ESTIMATORS: "Registry[Estimator]" = Registry("estimator")
ESTIMATORS.add("logme", Estimator("logme", logme, ("features",), True, "You et al. 2021"))
ESTIMATORS.add("leep", Estimator("leep", leep, ("source_probs",), False, "Nguyen et al. 2020"))
ESTIMATORS.add("nce", Estimator("nce", nce, ("source_probs",), False, "Tran et al. 2019"))
ESTIMATORS.add("hscore", Estimator("hscore", hscore, ("features",), False,
                                   "Bao et al. 2019; Ledoit-Wolf shrinkage, Ibrahim et al. 2022"))
