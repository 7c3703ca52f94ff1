"""The logistic-regression regime: the λ ↔ sklearn C mapping, one-vs-rest, agreement with sklearn on
real frozen features, and the regime end to end through the feature store."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from xfer import features
from xfer.contract import RunContext
from xfer.regimes import REGIMES, run_trial
from xfer.contract import Diverged
from xfer.options import OptionError
from xfer.logistic import (LinearProbeError, Standardizer, fit_logistic, logistic_objective)
from xfer.trial import DatasetRef, ModelSpec, TrialSpec


@pytest.fixture(scope="module")
def five_class():
    x, y = make_classification(n_samples=300, n_features=12, n_informative=8, n_redundant=2, n_classes=5,
                               random_state=0)
    return StandardScaler().fit_transform(x), y


def _sklearn(x, y, lam, **kw):
    return LogisticRegression(C=1.0 / (lam * len(y)), tol=1e-10, max_iter=100_000, **kw).fit(x, y)


# ------------------------------------------------------------------ (a) the λ ↔ C mapping
@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_multinomial_matches_sklearn_at_c_equals_one_over_lambda_n(five_class, lam):
    x, y = five_class
    n = len(y)
    fit = fit_logistic(torch.tensor(x), torch.tensor(y), lam, num_classes=5)
    assert fit.converged
    sk = _sklearn(x, y, lam)
    w, b = fit.weight.numpy(), fit.bias.numpy()
    assert np.abs(w - sk.coef_).max() <= 1e-3 * np.abs(sk.coef_).max()
    assert np.abs(b - sk.intercept_).max() <= 1e-3 * max(np.abs(sk.intercept_).max(), 1.0)
    # objectives: sklearn's C·ΣCE + ½‖W‖², divided by C·n, is our mean CE + (λ/2)‖W‖²
    c = 1.0 / (lam * n)
    sk_objective = c * log_loss(y, sk.predict_proba(x), normalize=False) + 0.5 * (sk.coef_ ** 2).sum()
    assert fit.objective == pytest.approx(sk_objective / (c * n), rel=1e-7)
    ours_at_sk = float(logistic_objective(torch.tensor(sk.coef_), torch.tensor(sk.intercept_), torch.tensor(x),
                                          torch.tensor(y), lam, multilabel=False))
    assert fit.objective == pytest.approx(ours_at_sk, rel=1e-7)


def test_the_mapping_is_not_c_equals_one_over_lambda(five_class):
    """The test above could not pass with the wrong mapping: C = 1/λ gives clearly different weights."""
    x, y = five_class
    lam = 1e-1
    fit = fit_logistic(torch.tensor(x), torch.tensor(y), lam, num_classes=5)
    wrong = LogisticRegression(C=1.0 / lam, tol=1e-10, max_iter=100_000).fit(x, y)
    assert np.abs(fit.weight.numpy() - wrong.coef_).max() > 0.1 * np.abs(wrong.coef_).max()


def test_bias_is_not_penalised():
    # one class is rare: the optimal bias is far from 0 and must stay there however large λ is
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (rng.random(200) < 0.1).astype(int)
    fit = fit_logistic(torch.tensor(x), torch.tensor(y), 1e4, num_classes=2)
    p = torch.softmax(fit.bias, 0).numpy()  # W ≈ 0 at huge λ: probabilities are the class frequencies
    assert p[1] == pytest.approx(y.mean(), abs=1e-3)
    # and it gets there quickly: the stiff W block must not stall the bias (see fit_logistic)
    assert fit.converged and fit.grad_max <= 1e-6 and fit.n_iter < 100


def test_objective_matches_sklearn_across_the_paper_range(five_class):
    """At every decade of the paper's grid (1e-6 … 1e5) our minimum is sklearn's minimum (at small λ
    the valley is flat, so compare objective values rather than weights there)."""
    x, y = five_class
    for lam in np.logspace(-6, 5, 12):
        fit = fit_logistic(torch.tensor(x), torch.tensor(y), float(lam), num_classes=5)
        assert fit.converged and fit.n_iter < 1000, lam
        sk = _sklearn(x, y, lam)
        at_sk = float(logistic_objective(torch.tensor(sk.coef_), torch.tensor(sk.intercept_), torch.tensor(x),
                                         torch.tensor(y), float(lam), multilabel=False))
        assert fit.objective == pytest.approx(at_sk, rel=1e-7, abs=1e-9), lam


# ------------------------------------------------------------------ (c) multi-label one-vs-rest
def test_multilabel_is_one_vs_rest_sklearn_per_class():
    rng = np.random.default_rng(1)
    n, d, c = 250, 8, 4
    x = rng.normal(size=(n, d))
    true_w = rng.normal(size=(c, d))
    y = (x @ true_w.T + rng.normal(size=(n, c)) > 0.5).astype(np.float64)
    lam = 1e-2
    fit = fit_logistic(torch.tensor(x), torch.tensor(y), lam, num_classes=c, multilabel=True)
    assert fit.converged
    objectives = []
    for j in range(c):
        sk = _sklearn(x, y[:, j], lam)
        w, b = fit.weight.numpy()[j], fit.bias.numpy()[j]
        assert np.abs(w - sk.coef_[0]).max() <= 1e-3 * np.abs(sk.coef_).max(), f"class {j}"
        assert b == pytest.approx(sk.intercept_[0], abs=1e-3 * max(1.0, abs(sk.intercept_[0])))
        cj = 1.0 / (lam * n)
        objectives.append((cj * log_loss(y[:, j], sk.predict_proba(x), normalize=False)
                           + 0.5 * (sk.coef_ ** 2).sum()) / (cj * n))
    assert fit.objective == pytest.approx(np.mean(objectives), rel=1e-6)  # reported: mean over classes


def test_regime_multilabel_reports_map11_from_one_vs_rest(monkeypatch, tmp_path):
    """A multi-label dataset (VOC 2007) goes through the same regime: multi-hot targets → one binary
    problem per class, scored with map11 (features stubbed: no offline multi-label dataset exists)."""
    rng = np.random.default_rng(2)
    c, d = 4, 6
    true_w = rng.normal(size=(c, d))

    def make(n):
        x = rng.normal(size=(n, d)) * 3 + 1
        return torch.tensor(x, dtype=torch.float32), torch.tensor((x @ true_w.T > 0).astype(np.float32))

    data = {"train": make(200), "val": make(80)}

    def fake(model, ref, splits, ctx, *, batch_size=256, variant=None):
        return {s: features.FeatureSet(features=data[s][0], targets=data[s][1], num_classes=c, multilabel=True,
                                       metric="map11", key=s) for s in splits}

    monkeypatch.setattr(features, "get_feature_sets", fake)
    res = run_trial(_tiny_trial(hparams={"l2": 1e-3}), RunContext.local(storage=tmp_path, data_root=tmp_path))
    assert res.status == "finished", res.message
    assert res.metric == "map11" and set(res.metrics) == {"val_map11", "train_loss", "solver_converged"}
    assert res.metrics["solver_converged"] == 1.0 and res.message == ""
    assert res.metrics["val_map11"] > 0.9  # linearly separable classes
    assert res.scores.shape == (80, c) and res.targets.shape == (80, c)


# ------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), "0.1", True])
def test_lambda_must_be_positive(lam):
    with pytest.raises(LinearProbeError, match="> 0"):
        fit_logistic(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), lam, num_classes=2)


def _tiny_trial(**kw) -> TrialSpec:
    base = dict(model=ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32),
                dataset=DatasetRef("synthetic_near"), regime="linear_probe", hparams={"l2": 1e-3},
                options={}, seed=0, stage="grid")
    base.update(kw)
    return TrialSpec(**base)


@pytest.mark.parametrize("hparams,match", [({"l2": 0.0}, "> 0"), ({"l2": -1e-3}, "> 0"),
                                           ({}, "takes the hyper-parameters l2, layer, pool, pca, train_size; got none"),
                                           ({"l2": 1.0, "lr": 0.1}, "takes the hyper-parameters l2, layer, pool, pca, train_size; got l2, lr")])
def test_regime_rejects_bad_penalty_before_touching_data(tmp_path, hparams, match):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d")
    with pytest.raises(OptionError, match=match):
        REGIMES.get("linear_probe").run(_tiny_trial(hparams=hparams), ctx)
    assert not (tmp_path / "s").exists()
    res = run_trial(_tiny_trial(hparams=hparams), ctx)
    assert res.status == "failed" and "l2" in res.message


def test_regime_rejects_unknown_options(tmp_path):
    ctx = RunContext.local(storage=tmp_path / "s", data_root=tmp_path / "d")
    with pytest.raises(OptionError, match="valid keys: max_iter, tol, standardize, batch_size"):
        REGIMES.get("linear_probe").run(_tiny_trial(options={"steps": 10}), ctx)


def test_non_finite_features_are_diverged(monkeypatch, tmp_path):
    with pytest.raises(Diverged):
        fit_logistic(torch.tensor([[0.0, math.nan], [1.0, 2.0]]), torch.tensor([0, 1]), 1.0, num_classes=2)

    def fake(model, ref, splits, ctx, *, batch_size=256, variant=None):
        x = torch.ones(6, 3)
        x[0, 0] = math.inf
        return {s: features.FeatureSet(features=x, targets=torch.tensor([0, 1, 0, 1, 0, 1]), num_classes=2,
                                       multilabel=False, metric="top1", key=s) for s in splits}

    monkeypatch.setattr(features, "get_feature_sets", fake)
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path)
    res = run_trial(_tiny_trial(), ctx)
    assert res.status == "diverged" and "NaN/inf" in res.message


def test_standardizer_uses_train_statistics_and_keeps_constant_columns_finite():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    st = Standardizer.fit(x)
    z = st(x)
    assert torch.allclose(z[:, 0], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.equal(z[:, 1], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(st(torch.tensor([[5.0, 6.0]])), torch.tensor([[3.0, 1.0]], dtype=torch.float64))


# ------------------------------------------------------------------ (b) real features: ours vs sklearn
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    return RunContext.local(storage=root / "storage", data_root=root / "data", device="cpu")


@pytest.mark.parametrize("lam", [1e-4, 1e-2])
def test_val_accuracy_matches_sklearn_on_real_digits_features(store, lam):
    model = ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32)
    trial = _tiny_trial(model=model, dataset=DatasetRef("digits"), hparams={"l2": lam})
    res = run_trial(trial, store)
    assert res.status == "finished", res.message
    ours = res.metrics["val_top1"]

    x_tr, y_tr = features.get_features(model, trial.dataset, "train", store)
    x_va, y_va = features.get_features(model, trial.dataset, "val", store)
    scaler = StandardScaler().fit(x_tr.double().numpy())
    sk = LogisticRegression(C=1.0 / (lam * len(y_tr)), tol=1e-8, max_iter=20_000).fit(
        scaler.transform(x_tr.double().numpy()), y_tr.numpy())
    theirs = accuracy_score(y_va.numpy(), sk.predict(scaler.transform(x_va.double().numpy())))
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    assert ours > 0.3  # well above 10% chance: the features and the fit are real
    assert res.scores.shape == (len(y_va), 10) and np.array_equal(res.targets, y_va.numpy())


# ------------------------------------------------------------------ (d) end to end
def test_run_trial_grid_and_final_on_synthetic_near(store):
    grid = _tiny_trial(hparams={"l2": 1e-2})
    res = run_trial(grid, store)
    assert res.status == "finished", res.message
    metric = res.metric
    assert set(res.metrics) == {f"val_{metric}", "train_loss", "solver_converged"}
    assert 0.0 <= res.metrics[f"val_{metric}"] <= 1.0
    assert math.isfinite(res.metrics["train_loss"]) and res.steps_done > 0

    final = run_trial(_tiny_trial(hparams={"l2": 1e-2}, stage="final"), store)
    assert final.status == "finished", final.message
    assert set(final.metrics) == {f"test_{metric}", "train_loss", "solver_converged"}
    assert 0.0 <= final.metrics[f"test_{metric}"] <= 1.0
    x_te, y_te = features.get_features(grid.model, grid.dataset, "test", store)
    assert final.scores.shape[0] == len(y_te) and np.array_equal(final.targets, y_te.numpy())


# ------------------------------------------------------------------ honest solver status
def test_fit_status_rule():
    from xfer.logistic import fit_status

    assert fit_status(1e-7, 1e-6, budget_spent=True) == "converged"  # the gradient test decides
    assert fit_status(1e-5, 1e-6, budget_spent=False) == "stalled"
    assert fit_status(1e-5, 1e-6, budget_spent=True) == "budget"


def test_a_stall_is_not_reported_as_converged(five_class):
    x, y = five_class
    # a tolerance float64 cannot reach: L-BFGS stops because the objective stops changing, not at a solution
    fit = fit_logistic(torch.tensor(x), torch.tensor(y), 1e-3, num_classes=5, tol=1e-18)
    assert fit.n_iter < 1000 and fit.grad_max > 1e-18
    assert fit.status == "stalled" and not fit.converged
    assert "stalled" in fit.note(1e-18)
    ok = fit_logistic(torch.tensor(x), torch.tensor(y), 1e-3, num_classes=5)
    assert ok.status == "converged" and ok.note(1e-6) == ""
    short = fit_logistic(torch.tensor(x), torch.tensor(y), 1e-3, num_classes=5, max_iter=2)
    assert short.status == "budget" and "budget" in short.note(1e-6)


def test_regime_tags_a_stalled_fit(store):
    res = run_trial(_tiny_trial(options={"tol": 1e-18}), store)
    assert res.status == "finished"
    assert res.metrics["solver_converged"] == 0.0 and "stalled" in res.message
