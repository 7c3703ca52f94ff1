"""The whole λ grid of the linear probe in one call: a path solver for the L2 logistic regression.

The regime (``xfer.regimes.linear_probe``) fits every λ of the paper's 45-value grid as an independent
cold L-BFGS run from zero weights. The solutions of neighbouring λ are close, and all of them share the
same feature matrix, so this module solves the grid as a *path*:

* **large → small λ with warm starts.** At λ = 1e5 the solution is ~0 (a few iterations); each next λ
  starts from the previous solution, plus a linear extrapolation in log λ when that lowers the objective.
  Switching λ at a point is free: the data term does not change, the penalty is ``(λ/2)‖W‖²``.
* **a preconditioner from the features' covariance.** L-BFGS's initial Hessian is
  ``γ · V diag(1/(c·e_k + λ)) Vᵀ`` for W (``e_k, V``: eigen-pairs of ``XᵀX/n``, ``c`` the softmax curvature at
  zero: 1/C, or 1/4 one-vs-rest) instead of a scalar. Pooled CNN features have power-law spectra, so at
  small λ the plain problem is ill-conditioned and L-BFGS crawls; this is the cure ``fit_logistic``'s
  scalar ``W = V/√(1+λ)`` rescaling only applies at one scale. One ``d×d`` eigendecomposition per call;
  only the top ``PRECONDITIONER_RANK`` eigen-directions are kept (the rest share their mean eigenvalue),
  so applying it costs a ``[C, D]·[D, 256]`` product, not ``[C, D]·[D, D]``, at the same iteration count.
* **L-BFGS memory carried across λ.** A curvature pair (s, y) of the objective at λ becomes the exact pair
  at λ' by ``y += (λ' − λ)·s_W``: the penalty is quadratic, only the data term's curvature is approximate.
* **float32 iterations, float64 polish.** Iterations run on a float32 copy of the features (the matmuls
  are the whole cost); every returned fit is then checked, and if needed finished, in float64.

The objective and the λ mapping are exactly the regime's (``logistic_objective``; sklearn's
C = 1/(λ n)); every fit reports the float64 objective and max |gradient| at the returned point, computed
in the original (W, b) coordinates. A fit's ``status`` is ``converged`` only when that gradient test
passes (max |grad| ≤ tol); float64 L-BFGS that could make no more progress (the line search found no
decrease, or the objective stopped changing) is ``stalled``, and running out of ``max_iter`` is
``budget``, each with a warning, as in ``fit_logistic``.

``fit_logistic`` itself has no warm-start argument, so the solver here is its own small L-BFGS (the
two-loop recursion with the preconditioner above; torch's strong-Wolfe line search). See
``benchmarks/probe_path.py`` for the speed against scikit-learn and against independent cold fits.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.optim.lbfgs import _strong_wolfe  # torch's line search (private but stable since 1.x)

from xfer.contract import Diverged
from xfer.logistic import LinearProbeError, LogisticFit, check_l2, fit_status

log = logging.getLogger(__name__)

HISTORY_SIZE = 20  # as fit_logistic
TOLERANCE_CHANGE = 64 * float(np.finfo(np.float64).eps)  # as fit_logistic: "no progress left" in float64
F32_RELATIVE_STALL = 1e-9  # float32 phase: objective change below this (relative) = float32 is used up
PRECONDITIONER_RANK = 256  # eigen-directions the preconditioner keeps; the rest share their mean eigenvalue

__all__ = ["fit_logistic_path", "path_decision_values", "check_l2_values"]


def check_l2_values(l2_values: Any) -> list[float]:
    """A non-empty sequence of finite λ > 0 (each as ``check_l2``); the message says which one is bad."""
    if isinstance(l2_values, (str, bytes)) or not hasattr(l2_values, "__len__"):
        raise LinearProbeError(f"linear_probe path: l2_values must be a non-empty list of numbers > 0, "
                               f"got {l2_values!r}")
    values = list(l2_values.tolist() if hasattr(l2_values, "tolist") else l2_values)
    if not values:
        raise LinearProbeError("linear_probe path: l2_values is empty; give at least one λ > 0 "
                               "(the paper's grid: 45 values log-spaced in [1e-6, 1e5])")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(check_l2(v))
        except LinearProbeError as e:
            raise LinearProbeError(f"linear_probe path: l2_values[{i}]: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------
# The problem in one flat variable z = [W.ravel(), b] (contiguous W: BLAS is ~1.5x faster than on a
# [C, D+1] slice); hand-written gradient (no autograd).
# ---------------------------------------------------------------------------------------------
def _split(z: torch.Tensor, num_classes: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return z[:num_classes * d].view(num_classes, d), z[num_classes * d:]


@dataclass
class _Problem:
    x: torch.Tensor  # [N, D] in the working dtype
    y: torch.Tensor  # [N] int64, or [N, C] multi-hot in the working dtype
    num_classes: int
    multilabel: bool

    def loss_grad(self, z: torch.Tensor, l2: float) -> tuple[float, torch.Tensor]:
        """The summed-over-classes objective of ``logistic_objective`` and its gradient (flat)."""
        n, d = self.x.shape
        w, b = _split(z, self.num_classes, d)
        logits = torch.addmm(b, self.x, w.T)
        if self.multilabel:
            # mean over examples of BCE, summed over classes; softplus(l) - y l, stably
            data = (torch.nn.functional.softplus(logits) - self.y * logits).sum(dtype=torch.float64) / n
            r = torch.sigmoid(logits).sub_(self.y)
        else:
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            picked = logits.gather(1, self.y[:, None])
            data = (lse - picked).sum(dtype=torch.float64) / n
            r = logits.sub_(lse).exp_()
            r.scatter_add_(1, self.y[:, None], torch.full_like(picked, -1.0))
        r.div_(n)
        g = torch.empty_like(z)
        gw, gb = _split(g, self.num_classes, d)
        torch.addmm(w, r.T, self.x, beta=l2, out=gw)
        torch.sum(r, dim=0, out=gb)
        penalty = 0.5 * l2 * float((w.to(torch.float64) ** 2).sum())
        return float(data) + penalty, g


class _Preconditioner:
    """H0 = V diag(1/(c e + λ)) Vᵀ on W's rows (+ 1/(c e0 + λ) off span V), 1/c on the bias."""

    def __init__(self, x: torch.Tensor, curvature: float, rank: int | None = PRECONDITIONER_RANK) -> None:
        n, d = x.shape
        if d <= n:
            gram = (x.T @ x).div_(n)
            e, v = torch.linalg.eigh(gram)
        else:  # work in the n-dim row space: XXᵀ = U diag(n e) Uᵀ, V = XᵀU/√(n e)
            e, u = torch.linalg.eigh((x @ x.T).div_(n))
            keep = e > 1e-6 * e.max().clamp_min(1e-30)
            e, u = e[keep], u[:, keep]
            v = (x.T @ u) / torch.sqrt(n * e)
        e = e.clamp_min(0.0)
        tail = 0.0 if d > n else float(e.min())  # directions off span V carry no data curvature
        if rank is not None and rank < e.numel():
            # keep the top eigen-directions (they carry the ill-conditioning of power-law spectra); the
            # others share their mean eigenvalue: one [C, D]·[D, rank] product per apply instead of [D, D]
            dropped = e[:-rank]
            tail = float(dropped.sum()) / (d - rank) if d > n else float(dropped.mean())
            e, v = e[-rank:], v[:, -rank:].contiguous()
        self.e, self.v, self.e0 = e, v, tail
        self.c = curvature
        self.d = d
        self.scale_w: torch.Tensor | None = None
        self.version = 0  # bumped on every change, so cached products H0·y are recomputed

    def set_l2(self, l2: float) -> None:
        s = 1.0 / (self.c * self.e + l2)
        self.s0 = 1.0 / (self.c * self.e0 + l2)
        self.scale_w = s - self.s0
        self.version += 1

    def to(self, dtype: torch.dtype) -> "_Preconditioner":
        self.v, self.e = self.v.to(dtype), self.e.to(dtype)
        if self.scale_w is not None:
            self.scale_w = self.scale_w.to(dtype)
        self.version += 1
        return self

    def apply(self, q: torch.Tensor, num_classes: int) -> torch.Tensor:
        qw, qb = _split(q, num_classes, self.d)
        out = torch.empty_like(q)
        ow, ob = _split(out, num_classes, self.d)
        torch.addmm(qw, (qw @ self.v) * self.scale_w, self.v.T, beta=self.s0, out=ow)
        torch.div(qb, self.c, out=ob)
        return out


class _Memory:
    """L-BFGS curvature pairs, kept across λ (y shifted by Δλ·s on the W part when λ changes)."""

    def __init__(self, size: int, d: int, num_classes: int) -> None:
        self.size, self.d, self.c = size, d, num_classes
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.rho: list[float] = []
        self._gamma: tuple[int, int, float] | None = None  # (pairs pushed, preconditioner version, γ)
        self._pushed = 0

    def clear(self) -> None:
        self.s, self.y, self.rho = [], [], []
        self._pushed += 1

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        ys = float(y.dot(s))
        if ys <= 1e-10 * float(y.dot(y)) ** 0.5 * float(s.dot(s)) ** 0.5 or not math.isfinite(ys):
            return  # not a curvature pair (line search noise); keep the old ones
        if len(self.s) == self.size:
            self.s.pop(0), self.y.pop(0), self.rho.pop(0)
        self.s.append(s), self.y.append(y), self.rho.append(1.0 / ys)
        self._pushed += 1

    def shift_l2(self, delta: float) -> None:
        for s, y in zip(self.s, self.y):
            y[:self.c * self.d].add_(s[:self.c * self.d], alpha=delta)
        keep = [i for i, (s, y) in enumerate(zip(self.s, self.y)) if float(y.dot(s)) > 0]
        self.s = [self.s[i] for i in keep]
        self.y = [self.y[i] for i in keep]
        self.rho = [1.0 / float(self.y[i].dot(self.s[i])) for i in range(len(self.s))]
        self._pushed += 1

    def to(self, dtype: torch.dtype) -> None:
        self.s = [s.to(dtype) for s in self.s]
        self.y = [y.to(dtype) for y in self.y]
        self._pushed += 1

    def _scale(self, pre: _Preconditioner) -> float:
        """γ = sᵀy / yᵀ H0 y of the newest pair, computed once per pair and preconditioner (one apply)."""
        if self._gamma is None or self._gamma[:2] != (self._pushed, pre.version):
            y = self.y[-1]
            self._gamma = (self._pushed, pre.version, 1.0 / (self.rho[-1] * float(y.dot(pre.apply(y, self.c)))))
        return self._gamma[2]

    def direction(self, g: torch.Tensor, pre: _Preconditioner) -> torch.Tensor:
        """−H g by the two-loop recursion with H0 = γ·pre (γ = sᵀy / yᵀ pre y, Nocedal & Wright 7.20)."""
        q = g.neg()
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            a = rho * float(s.dot(q))
            q.add_(y, alpha=-a)
            alphas.append(a)
        r = pre.apply(q, self.c)
        if self.s:
            r.mul_(self._scale(pre))
        for s, y, rho, a in zip(self.s, self.y, self.rho, reversed(alphas)):
            b = rho * float(y.dot(r))
            r.add_(s, alpha=a - b)
        return r


def _grad_max(g: torch.Tensor) -> float:
    return float(g.abs().max())


def _lbfgs(prob: _Problem, z: torch.Tensor, f: float, g: torch.Tensor, l2: float, mem: _Memory,
           pre: _Preconditioner, *, tol: float, max_iter: int, max_eval: int,
           float64: bool) -> tuple[torch.Tensor, float, torch.Tensor, int, int, str]:
    """L-BFGS from (z, f, g) until max |g| ≤ tol, no progress, or the budget; returns the reason."""
    n_iter = evals = 0
    reason = "budget"

    def obj(x0: torch.Tensor, t: float, d: torch.Tensor) -> tuple[float, torch.Tensor]:
        return prob.loss_grad(x0 + t * d, l2)

    while n_iter < max_iter and evals < max_eval:
        if _grad_max(g) <= tol:
            reason = "gradient"
            break
        d = mem.direction(g, pre)
        gtd = float(g.dot(d))
        if not gtd < 0:  # not a descent direction (stale memory): restart from the preconditioner alone
            mem.clear()
            d = mem.direction(g, pre)
            gtd = float(g.dot(d))
            if not gtd < 0:
                reason = "no progress"
                break
        t = 1.0  # the preconditioner is an inverse-Hessian estimate even with an empty memory
        f_new, g_new, t, ls_evals = _strong_wolfe(obj, z, t, d, f, g, gtd, max_ls=25)
        evals += ls_evals
        n_iter += 1
        if not math.isfinite(f_new):
            raise Diverged(f"logistic regression objective is not finite ({f_new}) at λ={l2:g}")
        if f_new > f:  # the line search found no decrease
            reason = "no progress"
            break
        s = d.mul(t)
        z = z + s
        mem.push(s, g_new - g)
        change = abs(f - f_new)
        f, g = f_new, g_new
        stall = TOLERANCE_CHANGE if float64 else F32_RELATIVE_STALL * max(abs(f), 1.0)
        if change <= stall or float(s.abs().max()) <= (TOLERANCE_CHANGE if float64 else 1e-7):
            reason = "no progress"
            break
    else:
        if _grad_max(g) <= tol:
            reason = "gradient"
    return z, f, g, n_iter, evals, reason


# ---------------------------------------------------------------------------------------------
# The path.
# ---------------------------------------------------------------------------------------------
def fit_logistic_path(x: torch.Tensor, y: torch.Tensor, l2_values: Sequence[float], *, num_classes: int,
                      multilabel: bool = False, max_iter: int = 1000, tol: float = 1e-6,
                      device: str | torch.device = "cpu", float32: bool = True, extrapolate: bool = True,
                      keep_memory: bool = True, precondition: bool = True,
                      preconditioner_rank: int | None = PRECONDITIONER_RANK) -> list[LogisticFit]:
    """Fit every λ of ``l2_values`` on the same (x, y); the fits come back in the order of ``l2_values``.

    Equivalent to ``[fit_logistic(x, y, l2, ...) for l2 in l2_values]`` (same objective, same minimiser
    up to ``tol``) but solved large → small λ with warm starts, a covariance preconditioner, L-BFGS memory
    carried across λ, and float32 iterations finished in float64 (see the module docstring; each switch
    exists to measure what it buys). ``max_iter`` and ``tol`` are per λ, as in ``fit_logistic``:
    ``converged`` means max |∂loss/∂(W, b)| ≤ tol in float64; ``status`` says stalled or budget otherwise.
    """
    lams = check_l2_values(l2_values)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise LinearProbeError(f"max_iter: expected an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise LinearProbeError(f"tol: expected a number > 0, got {tol!r}")
    x64 = torch.as_tensor(x).to(device=device, dtype=torch.float64)
    if x64.ndim != 2 or x64.shape[0] == 0:
        raise LinearProbeError(f"features must be a non-empty [N, D] matrix, got shape {tuple(x64.shape)}")
    if not torch.isfinite(x64).all():
        raise Diverged("the frozen features contain NaN/inf (the backbone's forward pass overflowed)")
    n, d = x64.shape
    y = torch.as_tensor(y).to(device)
    if multilabel:
        if y.shape != (n, num_classes):
            raise LinearProbeError(f"multi-label targets must be [N, C] = [{n}, {num_classes}], got {tuple(y.shape)}")
        y64 = y.to(torch.float64)
    else:
        if y.shape != (n,):
            raise LinearProbeError(f"targets must be [N] = [{n}] class ids, got {tuple(y.shape)}")
        y64 = y.to(torch.int64)
        if int(y64.min()) < 0 or int(y64.max()) >= num_classes:
            raise LinearProbeError(f"class ids must lie in [0, {num_classes - 1}], "
                                   f"got [{int(y64.min())}, {int(y64.max())}]")
    p64 = _Problem(x64, y64, num_classes, multilabel)
    work_dtype = torch.float32 if float32 else torch.float64
    pw = p64 if not float32 else _Problem(x64.to(torch.float32), y64 if not multilabel else y64.to(torch.float32),
                                          num_classes, multilabel)
    curvature = 0.25 if multilabel else 1.0 / max(num_classes, 2)
    pre = _Preconditioner(pw.x, curvature, preconditioner_rank) if precondition else None
    if pre is None:  # scalar preconditioner: the identity metric (no eigendecomposition)
        pre = _Preconditioner.__new__(_Preconditioner)
        pre.e, pre.v = torch.zeros(0, dtype=work_dtype, device=device), torch.zeros(d, 0, dtype=work_dtype, device=device)
        pre.e0, pre.c, pre.d, pre.scale_w, pre.version = 1.0, curvature, d, None, 0
    mem = _Memory(HISTORY_SIZE, d, num_classes)
    max_eval = max(max_iter * 5 // 4, 1)

    order = sorted(range(len(lams)), key=lambda i: -lams[i])
    fits: list[LogisticFit | None] = [None] * len(lams)
    z = torch.zeros(num_classes * (d + 1), dtype=work_dtype, device=device)
    prev: list[tuple[float, torch.Tensor]] = []  # (λ, solution) of the last two solved λ
    f = g = None
    cur_l2 = None
    for i in order:
        l2 = lams[i]
        pre.set_l2(l2)
        if f is None:
            f, g = pw.loss_grad(z, l2)
        else:  # move the point's objective and gradient to the new λ: only the penalty changes
            wz = z[:num_classes * d]
            f = f + 0.5 * (l2 - cur_l2) * float((wz.to(torch.float64) ** 2).sum())
            g = g.clone()
            g[:num_classes * d].add_(wz, alpha=l2 - cur_l2)
            if keep_memory:
                mem.shift_l2(l2 - cur_l2)
            else:
                mem.clear()
            if extrapolate and len(prev) == 2 and prev[0][0] != prev[1][0] and l2 != cur_l2:
                (la, za), (lb, zb) = prev
                step = (math.log(l2) - math.log(lb)) / (math.log(lb) - math.log(la))
                zp = zb + step * (zb - za)
                fp, gp = pw.loss_grad(zp, l2)
                if fp < f:
                    z, f, g = zp, fp, gp
        cur_l2 = l2
        z, f, g, it, ev, reason = _lbfgs(pw, z, f, g, l2, mem, pre, tol=tol, max_iter=max_iter, max_eval=max_eval,
                                         float64=not float32)
        # float64: check, and finish if float32 stopped short
        z64 = z.to(torch.float64)
        f64, g64 = p64.loss_grad(z64, l2) if float32 else (f, g)
        if float32 and _grad_max(g64) > tol and it < max_iter:
            pre.to(torch.float64), mem.to(torch.float64)
            z64, f64, g64, it2, ev2, reason = _lbfgs(p64, z64, f64, g64, l2, mem, pre, tol=tol,
                                                     max_iter=max_iter - it, max_eval=max(max_eval - ev, 1),
                                                     float64=True)
            it, ev = it + it2, ev + ev2
            pre.to(work_dtype), mem.to(work_dtype)
        elif float32 and reason == "no progress":
            reason = "gradient" if _grad_max(g64) <= tol else "budget"  # a float32 stall proves nothing
        if not math.isfinite(f64):
            raise Diverged(f"logistic regression objective is not finite ({f64}) at λ={l2:g}")
        z, f, g = z64.to(work_dtype), f64, g64.to(work_dtype)
        grad_max = _grad_max(g64)
        status = fit_status(grad_max, tol, budget_spent=reason != "no progress")
        if status != "converged":
            log.warning("path L-BFGS %s at λ=%g after %d iterations; max |gradient| %.3g > tol %.3g",
                        "stalled" if status == "stalled" else "used its budget", l2, it, grad_max, tol)
        w64, b64 = _split(z64, num_classes, d)
        fits[i] = LogisticFit(weight=w64.clone(), bias=b64.clone(),
                              objective=f64 / num_classes if multilabel else f64, n_iter=it, grad_max=grad_max,
                              status=status, multilabel=multilabel)
        log.debug("path λ=%g: %d iterations, %d evaluations, objective %.10g, max|grad| %.2g (%s)",
                  l2, it, ev, f64, grad_max, reason)
        prev = (prev + [(l2, z.clone())])[-2:]
    return fits  # type: ignore[return-value]


def path_decision_values(fits: Sequence[LogisticFit], x: torch.Tensor) -> list[torch.Tensor]:
    """Decision values [N, C] of every fit on features ``x`` (logits, or one-vs-rest scores), in the
    order of ``fits``: what a caller turns into one metric per λ (e.g. ``xfer.metrics.compute_metric``).
    ``x`` must be standardised as the training features were."""
    if not fits:
        return []
    w = torch.stack([f.weight for f in fits])  # [K, C, D]
    b = torch.stack([f.bias for f in fits])
    xx = torch.as_tensor(x).to(w.device, torch.float64)
    if xx.ndim != 2 or xx.shape[1] != w.shape[2]:
        raise LinearProbeError(f"features must be [N, {w.shape[2]}], got shape {tuple(xx.shape)}")
    return list(torch.einsum("nd,kcd->knc", xx, w) + b[:, None, :])
