"""The linear probe's solver: L2-regularised logistic regression by L-BFGS on feature matrices.

Pure functions (no data loading, no models): ``fit_logistic`` minimises the multinomial (or, for
multi-label data, one-vs-rest) objective below with ``torch.optim.LBFGS`` (strong-Wolfe line search)
on the full feature matrix in float64, from zero weights.

The penalty λ, precisely (n training examples, W [C, D] weights, b [C] biases, bias unpenalised)::

    loss(W, b) = (1/n) Σ_i CE(W x_i + b, y_i)  +  (λ/2) ‖W‖²_F

scikit-learn's ``LogisticRegression`` minimises ``C Σ_i CE_i + ½‖W‖²``; dividing that by ``C n``
gives ``(1/n) Σ_i CE_i + ‖W‖² / (2 C n)`` — the loss above with ``λ = 1/(C n)``, i.e. **C = 1/(λ n)**.
Both have the same minimiser, and ``tests/test_linear_probe.py`` checks weights and objective against
sklearn. (So λ is a per-example penalty: the same λ means the same strength on a small and a large
dataset, whereas sklearn's C must shrink as n grows.)

Multi-label data (PASCAL VOC 2007) is one-vs-rest: one binary logistic regression per class,
``(1/n) Σ_i BCE(w_c·x_i + b_c, y_ic) + (λ/2)‖w_c‖²`` (sklearn's binary objective with the same
C = 1/(λ n)). The classes are independent, so they are solved together by minimising their sum; the
reported ``train_loss`` is the mean over classes of the per-class objectives.

``standardize`` (default on) z-scores every feature with the *training* split's mean and standard
deviation before fitting (evaluation features use the same statistics). Pooled post-ReLU features
have per-dimension scales that differ by orders of magnitude; an ill-conditioned Hessian makes L-BFGS
crawl, especially at small λ. λ then applies to weights on standardised features; comparisons with
sklearn must feed it the same standardised features (the test does).

Inside ``fit_logistic`` the problem is rescaled for torch's L-BFGS (W = V/√(1+λ), objective × n; see
the comments there) — a change of variables that leaves the minimiser and the reported loss unchanged
and keeps every λ of the grid to tens or a few hundred iterations.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xfer.contract import Diverged

log = logging.getLogger(__name__)

# how a fit ended; only "converged" passed the gradient test (max |∂loss/∂(W, b)| ≤ tol)
FIT_STATUSES = ("converged", "stalled", "budget")
HISTORY_SIZE = 20  # L-BFGS memory; scipy (sklearn's solver) uses 10; 20 x D x C floats stays small
TOLERANCE_CHANGE = 64 * float(np.finfo(np.float64).eps)  # as sklearn passes scipy (ftol): stop on no progress


class LinearProbeError(ValueError):
    """A bad linear-probe trial (penalty, options, features); the message says what is valid."""


# ---------------------------------------------------------------------------------------------
# The solver: pure functions on feature matrices (no data loading, no models).
# ---------------------------------------------------------------------------------------------
@dataclass
class Standardizer:
    """Per-feature z-scoring with statistics of the training features. Constant features get scale 1
    (as sklearn's StandardScaler), so they stay constant instead of becoming NaN."""

    mean: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def fit(x: torch.Tensor) -> "Standardizer":
        x = x.to(torch.float64)
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        scale = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
        return Standardizer(mean=mean, scale=scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean.to(x.device)) / self.scale.to(x.device)


@dataclass
class PCA:
    """Principal-component projection fitted on the training features only (Azizpour et al. 2014's
    dimensionality factor): ``fit`` sees the training split, ``__call__`` applies the same centring and
    components to any split, so held-out features never shape the projection. Components are the top
    eigenvectors of the training covariance (float64), each signed so its largest-magnitude entry is
    positive (deterministic across runs)."""

    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [D, k]
    explained: torch.Tensor  # [k] fraction of the training variance each component carries

    @staticmethod
    def fit(x: torch.Tensor, k: int) -> "PCA":
        """The top ``min(k, D, N)`` components of ``x`` [N, D] (fewer than asked when the features are
        narrower or fewer than ``k``)."""
        if k < 1:
            raise ValueError(f"PCA needs k >= 1 components, got {k!r}")
        x = x.to(torch.float64)
        mean = x.mean(dim=0)
        xc = x - mean
        cov = xc.T @ xc / max(len(x) - 1, 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        k = min(k, x.shape[1], len(x))
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        sign = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
        total = torch.clamp(torch.trace(cov), min=1e-300)
        return PCA(mean=mean, components=vectors * torch.where(sign == 0, 1.0, sign),
                   explained=values.clamp(min=0) / total)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean.to(x.device)) @ self.components.to(x.device)


@dataclass
class LogisticFit:
    """A fitted (multinomial or one-vs-rest) logistic regression."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    objective: float  # the loss in the module docstring at the solution (mean over classes for multi-label)
    n_iter: int  # L-BFGS iterations
    grad_max: float  # max |gradient| at the solution
    status: str  # FIT_STATUSES: converged (gradient test passed) | stalled (no progress, test failed) | budget
    multilabel: bool

    def __post_init__(self) -> None:
        if self.status not in FIT_STATUSES:
            raise ValueError(f"unknown fit status {self.status!r}; valid: {', '.join(FIT_STATUSES)}")

    @property
    def converged(self) -> bool:
        """Only a fit whose gradient test passed: a line search that found no decrease, or an objective
        that stopped changing, says the solver stopped, not that it reached the minimum."""
        return self.status == "converged"

    def note(self, tol: float) -> str:
        """Why the fit is not converged ('' when it is), for the trial's message."""
        if self.converged:
            return ""
        why = "stalled (no further progress)" if self.status == "stalled" else f"used its budget ({self.n_iter} iterations)"
        return f"L-BFGS {why}: max |grad| {self.grad_max:.2g} > tol {tol:.2g}"

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] (multinomial) or per-class decision values (one-vs-rest)."""
        return x.to(self.weight.device, torch.float64) @ self.weight.T + self.bias


def logistic_objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       l2: float, multilabel: bool) -> torch.Tensor:
    """The minimised objective (see the module docstring). For multi-label it is the *sum* over classes
    of the per-class objectives, so each class's gradient is exactly its own problem's gradient."""
    logits = x @ weight.T + bias
    penalty = 0.5 * l2 * (weight * weight).sum()
    if multilabel:
        per_class = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0)
        return per_class.sum() + penalty
    return F.cross_entropy(logits, y) + penalty


def check_l2(l2: Any) -> float:
    """λ must be a finite number > 0 (λ = 0 makes separable data unbounded; the paper's grid is 1e-6…1e5)."""
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 <= 0:
        raise LinearProbeError(f"linear_probe: the L2 penalty l2 (λ) must be a finite number > 0, got {l2!r} "
                               "(the paper's grid: 45 values log-spaced in [1e-6, 1e5])")
    return float(l2)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, *, num_classes: int, multilabel: bool = False,
                 max_iter: int = 1000, tol: float = 1e-6, device: str | torch.device = "cpu") -> LogisticFit:
    """Minimise the L2-regularised logistic loss over (W, b) with L-BFGS from zeros.

    ``x`` [N, D] features (already standardised if wanted); ``y`` [N] class ids, or [N, C] multi-hot
    when ``multilabel``. ``tol`` bounds the largest gradient component at the solution (as sklearn's
    ``tol`` for lbfgs). Raises ``Diverged`` when the objective is not finite.
    """
    l2 = check_l2(l2)
    x = torch.as_tensor(x).to(device=device, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise LinearProbeError(f"features must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise Diverged("the frozen features contain NaN/inf (the backbone's forward pass overflowed)")
    y = torch.as_tensor(y).to(device)
    if multilabel:
        if y.shape != (x.shape[0], num_classes):
            raise LinearProbeError(f"multi-label targets must be [N, C] = [{x.shape[0]}, {num_classes}], "
                                   f"got {tuple(y.shape)}")
        y = y.to(torch.float64)
    else:
        if y.shape != (x.shape[0],):
            raise LinearProbeError(f"targets must be [N] = [{x.shape[0]}] class ids, got {tuple(y.shape)}")
        y = y.to(torch.int64)
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise LinearProbeError(f"class ids must lie in [0, {num_classes - 1}], "
                                   f"got [{int(y.min())}, {int(y.max())}]")
    # Two changes of scale for torch's L-BFGS, neither of which moves the minimiser:
    # * W = V / sqrt(1 + λ): on standardised features the data term's curvature per weight is O(1)
    #   and the penalty adds λ, while the bias only has the data curvature. Without this, at large λ
    #   the scalar initial Hessian of L-BFGS fits the stiff W block and the bias crawls (hundreds of
    #   iterations at λ = 1e3..1e5 instead of ~10).
    # * minimise n · loss (the summed form): torch drops curvature pairs with yᵀs ≤ 1e-10 *absolute*,
    #   which for a mean loss near the optimum is most of them; L-BFGS itself is invariant to the scale.
    n = x.shape[0]
    w_scale = math.sqrt(1.0 + l2)
    v = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=device, requires_grad=True)
    # |∂(n·loss)/∂V| ≤ tol·n/scale  ⇔  |∂loss/∂W| ≤ tol (and |∂loss/∂b| ≤ tol/scale: stricter)
    opt = torch.optim.LBFGS([v, bias], lr=1.0, max_iter=max_iter, max_eval=max(max_iter * 5 // 4, 1),
                            tolerance_grad=tol * n / w_scale, tolerance_change=TOLERANCE_CHANGE,
                            history_size=HISTORY_SIZE, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = n * logistic_objective(v / w_scale, bias, x, y, l2, multilabel)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    n_iter, func_evals = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    # objective and gradient at the returned point, in the original variables
    weight = (v.detach() / w_scale).requires_grad_(True)
    b = bias.detach().requires_grad_(True)
    loss = logistic_objective(weight, b, x, y, l2, multilabel)
    loss.backward()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise Diverged(f"logistic regression objective is not finite ({value}) at λ={l2:g}")
    grad_max = float(max(weight.grad.abs().max(), b.grad.abs().max()))
    # converged only when the gradient test passes; L-BFGS also stops when the loss or the step stop
    # changing, which is a stall, not a solution
    status = fit_status(grad_max, tol, budget_spent=n_iter >= max_iter or func_evals >= opt.defaults["max_eval"])
    if status != "converged":
        log.warning("L-BFGS %s at λ=%g after %d iterations; max |gradient| %.3g > tol %.3g",
                    "stalled" if status == "stalled" else "used its budget", l2, n_iter, grad_max, tol)
    objective = value / num_classes if multilabel else value
    return LogisticFit(weight=weight.detach(), bias=b.detach(), objective=objective, n_iter=n_iter,
                       grad_max=grad_max, status=status, multilabel=multilabel)


def fit_status(grad_max: float, tol: float, *, budget_spent: bool) -> str:
    """converged when max |gradient| ≤ tol; otherwise budget (ran out of iterations) or stalled."""
    if grad_max <= tol:
        return "converged"
    return "budget" if budget_spent else "stalled"


