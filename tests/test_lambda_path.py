"""The λ-path solver (xfer.lambda_path) against independent fit_logistic fits: objective and accuracy per
λ, the input order, one-vs-rest, bad λ lists, and the warm start's effect. Small synthetic features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xfer.lambda_path import fit_logistic_path, path_decision_values
from xfer.logistic import LinearProbeError, Standardizer, fit_logistic, logistic_objective

LAMS = np.logspace(-4, 2, 7).tolist()


def _clusters(n: int, d: int, classes: int, sep: float, seed: int, power: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, d + 1, dtype=torch.float64).pow(-power)  # power-law spectrum, like CNN features
    means = sep * torch.randn(classes, d, generator=g, dtype=torch.float64) * scales
    y = torch.randint(0, classes, (2 * n,), generator=g)
    x = means[y] + torch.randn(2 * n, d, generator=g, dtype=torch.float64) * scales
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = x @ q.T + 3.0  # correlated features: z-scoring cannot undo the spread of the spectrum
    st = Standardizer.fit(x[:n])
    return st(x[:n]), y[:n], st(x[n:]), y[n:]


@pytest.fixture(scope="module")
def five_class():
    return _clusters(300, 24, 5, 0.4, 0)


@pytest.fixture(scope="module")
def path_and_cold(five_class):
    x, y, _, _ = five_class
    return (fit_logistic_path(x, y, LAMS, num_classes=5),
            [fit_logistic(x, y, lam, num_classes=5) for lam in LAMS])


def test_matches_independent_fits_per_lambda(five_class, path_and_cold):
    x, y, xv, yv = five_class
    path, cold = path_and_cold
    assert len(path) == len(LAMS)
    for lam, p, c in zip(LAMS, path, cold):
        assert p.converged and p.grad_max <= 1e-6, lam
        # the objective reported is logistic_objective at the returned weights, in float64
        assert p.objective == pytest.approx(float(logistic_objective(p.weight, p.bias, x, y, lam, False)), rel=1e-12)
        # both minimise the same strongly convex objective: same value (both stop at max |grad| <= 1e-6,
        # which at small λ leaves ~1e-6 relative slack), same weights
        assert p.objective == pytest.approx(c.objective, rel=1e-5), lam
        assert (p.weight - c.weight).abs().max() <= 1e-2 * max(float(c.weight.abs().max()), 1e-3), lam
    acc_p = [float((s.argmax(1) == yv).double().mean()) for s in path_decision_values(path, xv)]
    acc_c = [float((c.decision_function(xv).argmax(1) == yv).double().mean()) for c in cold]
    assert max(abs(a - b) for a, b in zip(acc_p, acc_c)) <= 0.003
    assert np.argmax(acc_p) == np.argmax(acc_c)
    assert 0.5 < max(acc_p) < 1.0  # a problem where λ matters, not a trivial one


def test_decision_values_are_each_fits(five_class, path_and_cold):
    _, _, xv, _ = five_class
    path, _ = path_and_cold
    scores = path_decision_values(path, xv)
    for fit, s in zip(path, scores):
        assert s.shape == (len(xv), 5)
        torch.testing.assert_close(s, fit.decision_function(xv))
    with pytest.raises(LinearProbeError, match=r"\[N, 24\]"):
        path_decision_values(path, xv[:, :3])


def test_order_follows_the_input_even_unsorted(five_class, path_and_cold):
    x, y, _, _ = five_class
    path, _ = path_and_cold
    perm = [3, 0, 6, 1, 5, 2, 4]
    shuffled = fit_logistic_path(x, y, [LAMS[i] for i in perm], num_classes=5)
    for k, i in enumerate(perm):
        assert shuffled[k].objective == pytest.approx(path[i].objective, rel=1e-7)
    # the objectives differ across λ, so a wrong order could not pass the check above
    assert len({round(p.objective, 6) for p in path}) == len(LAMS)


def test_multilabel_one_vs_rest(five_class):
    x, y, xv, _ = five_class
    g = torch.Generator().manual_seed(1)
    multi = torch.nn.functional.one_hot(y, 5).to(torch.float64)
    multi[torch.rand(len(y), 5, generator=g) < 0.15] = 1.0  # a second label on some examples
    lams = [1e-1, 1e-3, 1e-2]
    path = fit_logistic_path(x, multi, lams, num_classes=5, multilabel=True)
    for lam, p in zip(lams, path):
        c = fit_logistic(x, multi, lam, num_classes=5, multilabel=True)
        assert p.multilabel and p.converged
        assert p.objective == pytest.approx(c.objective, rel=1e-7), lam
        torch.testing.assert_close(p.decision_function(xv), c.decision_function(xv), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad, match", [([], "empty"), ([1e-2, 0.0], r"l2_values\[1\].*> 0"),
                                        ([1e-2, -1.0], r"l2_values\[1\]"), ([float("nan")], r"l2_values\[0\]"),
                                        ([1e-3, float("inf")], r"l2_values\[1\]"), ("1e-3", "list of numbers"),
                                        ([True], r"l2_values\[0\]")])
def test_bad_lambda_lists_raise(five_class, bad, match):
    x, y, _, _ = five_class
    with pytest.raises(LinearProbeError, match=match):
        fit_logistic_path(x, y, bad, num_classes=5)


def test_warm_start_matters():
    """Small λ on nearly separable data: from zeros L-BFGS needs hundreds of iterations; along the path
    it starts next to the solution. Same optimum, far fewer iterations (and a tight budget shows it)."""
    x, y, _, _ = _clusters(400, 40, 4, 0.5, 2, power=1.5)  # ill-conditioned
    lams = np.logspace(-5, 1, 13).tolist()
    warm = fit_logistic_path(x, y, lams, num_classes=4)
    cold = fit_logistic(x, y, lams[0], num_classes=4)
    assert cold.n_iter > 100
    assert warm[0].n_iter < cold.n_iter / 4
    assert warm[0].objective == pytest.approx(cold.objective, rel=1e-4)
    # the same λ alone (no path to come down) under the budget the path needed does not converge
    alone = fit_logistic_path(x, y, [lams[0]], num_classes=4, max_iter=max(warm[0].n_iter, 1),
                              extrapolate=False, precondition=False, keep_memory=False)
    assert not alone[0].converged and alone[0].grad_max > 1e-6


def test_unconverged_is_reported_honestly(five_class):
    x, y, _, _ = five_class
    fits = fit_logistic_path(x, y, [1e-4], num_classes=5, max_iter=2, precondition=False)
    assert not fits[0].converged and fits[0].grad_max > 1e-6 and fits[0].n_iter <= 2


@pytest.mark.parametrize("rank", [4, None])
def test_truncated_preconditioner_reaches_the_same_minimisers(five_class, path_and_cold, rank):
    """The preconditioner keeps only the top eigen-directions on wide features (the rest share their mean
    eigenvalue); it changes the iterations, never the answer: same objective per λ as independent fits."""
    x, y, _, _ = five_class
    _, cold = path_and_cold
    path = fit_logistic_path(x, y, LAMS, num_classes=5, preconditioner_rank=rank)
    for lam, p, c in zip(LAMS, path, cold):
        assert p.converged and p.grad_max <= 1e-6, lam
        assert p.objective == pytest.approx(c.objective, rel=1e-5), lam


def test_a_float64_stall_is_tagged_stalled_not_converged(five_class):
    x, y, _, _ = five_class
    fits = fit_logistic_path(x, y, [1e-1, 1e-3], num_classes=5, tol=1e-18)
    for f in fits:
        assert f.n_iter < 1000 and f.grad_max > 1e-18
        assert f.status == "stalled" and not f.converged
    assert all(f.status == "converged" for f in fit_logistic_path(x, y, [1e-1, 1e-3], num_classes=5))
