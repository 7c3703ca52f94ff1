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


# ------------------------------------------------------------------ the sweep file
def test_spec_estimators_are_validated_with_the_valid_names():
    from xfer.spec import SpecError, parse_spec

    base = {"name": "s", "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
            "datasets": ["digits"], "regimes": {"linear_probe": {"grid": {"l2": [0.1]}}}}
    assert parse_spec(base).estimators == ()
    assert parse_spec({**base, "estimators": ["logme", "nce"]}).estimators == ("logme", "nce")
    with pytest.raises(SpecError, match=r"spec.estimators\[1\]: unknown estimator 'leap'.*Did you mean 'leep'.*"
                                        r"Valid: hscore, leep, logme, nce"):
        parse_spec({**base, "estimators": ["logme", "leap"]})
    with pytest.raises(SpecError, match="a list of estimator names"):
        parse_spec({**base, "estimators": "logme"})
    with pytest.raises(SpecError, match="repeated: nce"):
        parse_spec({**base, "estimators": ["nce", "nce"]})


# ------------------------------------------------------------------ the source head
def _state_dict_file(tmp_path, arch: str = "test_resnet", classes: int = 5, seed: int = 0):
    import timm
    import torch

    torch.manual_seed(seed)
    net = timm.create_model(arch, num_classes=classes).eval()
    path = tmp_path / f"{arch}-{seed}.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.mark.parametrize("arch", ["test_resnet", "test_byobnet", "test_efficientnet"])
def test_source_probabilities_equal_the_full_models_softmax(tmp_path, arch):
    """The source head applied to the pooled features (what the feature store keeps) gives the same
    predictions as the whole source model on the images."""
    import torch

    from xfer.contract import RunContext
    from xfer.estimate import source_probabilities
    from xfer.models import load_backbone
    from xfer.trial import ModelSpec

    net, path = _state_dict_file(tmp_path, arch)
    model = ModelSpec(name="m", arch=arch, weights="file", weights_file=str(path), input_size=32)
    ctx = RunContext.local(tmp_path / "store", tmp_path / "data")
    backbone = load_backbone(model, num_classes=0, ctx=ctx)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        feats = backbone.model.eval()(x)
        expected = torch.softmax(net(x).double(), dim=1).numpy()
    probs = source_probabilities(model, feats, ctx, fingerprint=backbone.fingerprint)
    assert probs.shape == (6, 5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError, match="cached features were made from weights"):
        source_probabilities(model, feats, ctx, fingerprint="file:someone-else")


def test_random_weights_have_no_source_head(tmp_path):
    from xfer.contract import RunContext
    from xfer.estimate import NoSourceHead, source_head
    from xfer.trial import ModelSpec

    with pytest.raises(NoSourceHead, match="random weights"):
        source_head(ModelSpec(name="r", arch="test_resnet", weights="random"), RunContext.local(tmp_path, tmp_path))


# ------------------------------------------------------------------ the report section
def test_agreement_of_a_perfect_a_reversed_and_a_too_short_ranking():
    from xfer.report_estimators import agreement

    acc = [0.5, 0.6, 0.7, 0.9]
    assert agreement([1, 2, 3, 4], acc)[:2] == (pytest.approx(0.9827, abs=1e-3), pytest.approx(1.0))
    assert agreement([4, 3, 2, 1], acc)[1] == pytest.approx(-1.0)
    r, tau, n = agreement([1, 2, np.nan, 4], acc[:2] + [np.nan, 0.9])
    assert n == 3 and np.isfinite(tau)
    assert all(np.isnan(v) for v in agreement([1, 2], [0.1, 0.2])[:2])


def _study(tmp_path=None):
    """Four models on two datasets: 'oracle' scores each model by its fine-tuned accuracy, 'contrary'
    by its negative; source top-1 agrees with fine-tuning on d1 only."""
    import pandas as pd

    models = ["a", "b", "c", "d"]
    src = {"a": 0.5, "b": 0.6, "c": 0.7, "d": 0.8}
    ft = {"d1": [0.60, 0.70, 0.80, 0.90], "d2": [0.90, 0.85, 0.70, 0.60]}
    lp = {"d1": [0.50, 0.55, 0.65, 0.70], "d2": [0.70, 0.68, 0.60, 0.50]}
    rows, est = [], []
    for d in ("d1", "d2"):
        for i, m in enumerate(models):
            rows.append({"model": m, "dataset": d, "regime": "finetune", "source_top1": src[m], "metric": "top1",
                         "value": ft[d][i]})
            rows.append({"model": m, "dataset": d, "regime": "linear_probe", "source_top1": src[m], "metric": "top1",
                         "value": lp[d][i]})
            for name, score in (("oracle", ft[d][i] * 10), ("contrary", -ft[d][i])):
                est.append({"model": m, "dataset": d, "estimator": name, "score": score, "seconds": 0.01,
                            "source_seconds": 0.5, "features_seconds": 2.0,  # per pair
                            "needs_source": name == "contrary", "n": 100, "run_id": f"r-{m}-{d}"})
    return pd.DataFrame(rows), pd.DataFrame(est)


def test_agreement_table_and_the_closest_estimator():
    from xfer.report_estimators import MEAN, SOURCE, agreement_table, closest

    results, est = _study()
    t = agreement_table(est, results)
    assert set(t["regime"]) == {"finetune", "linear_probe"}
    one = t.set_index(["regime", "dataset", "predictor"])
    assert one.loc[("finetune", "d1", "oracle"), "tau_w"] == pytest.approx(1.0)
    assert one.loc[("finetune", "d2", "contrary"), "tau_w"] == pytest.approx(-1.0)
    assert one.loc[("finetune", "d1", SOURCE), "tau_w"] == pytest.approx(1.0)
    assert one.loc[("finetune", "d2", SOURCE), "tau_w"] == pytest.approx(-1.0)
    assert one.loc[("finetune", MEAN, SOURCE), "tau_w"] == pytest.approx(0.0)
    assert one.loc[("finetune", MEAN, "oracle"), "n_datasets"] == 2
    assert closest(t, "finetune") == ("oracle", pytest.approx(1.0))


def test_cost_table_adds_the_source_head_to_the_estimators_that_read_it():
    from xfer.report_estimators import cost_table

    _, est = _study()
    cost = cost_table(est, {"finetune": 100.0, "linear_probe": 20.0}).set_index("what")
    assert cost.loc["estimator oracle", "seconds"] == pytest.approx(8 * 0.01)
    assert cost.loc["estimator contrary", "seconds"] == pytest.approx(8 * 0.01 + 8 * 0.5)
    assert cost.loc["feature extraction", "seconds"] == pytest.approx(8 * 2.0)
    assert cost.loc["grid: all regimes", "seconds"] == pytest.approx(120.0)


def test_the_report_gains_the_estimator_section_and_figure(tmp_path):
    from xfer.report import build_report

    results, est = _study()
    made = build_report(results, tmp_path, estimates=est, grid_seconds={"finetune": 100.0}, n_boot=200)
    md = made["report_md"].read_text()
    assert "## Transferability estimators: ranking models without training" in md
    assert "![Weighted Kendall τ" in md and made["fig_estimators"].is_file()
    assert "finetune: oracle ranked the models closest (mean τ_w = 1.00; source top-1: 0.00)" in md
    assert "data:image/png;base64" in made["report_html"].read_text()
    assert len(__import__("pandas").read_csv(made["estimates_csv"])) == len(est)


# ------------------------------------------------------------------ the stage, on real MLflow and a real feature store
@pytest.mark.integration
def test_estimate_stage_logs_one_run_per_pair_and_reruns_reuse_it(tmp_path):
    import io

    import mlflow
    import yaml

    from xfer.estimate import estimate_key, run_estimates
    from xfer.layout import StorageLayout
    from xfer.spec import load_spec
    from xfer.tracking.estimates import load_estimates
    from xfer.tracking.writer import SweepTracker

    _, w1 = _state_dict_file(tmp_path, seed=1)
    _, w2 = _state_dict_file(tmp_path, seed=2)
    raw = {"name": "est", "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
           "models": [{"name": "src1", "arch": "test_resnet", "weights": "file", "weights_file": str(w1), "input_size": 16},
                      {"name": "src2", "arch": "test_resnet", "weights": "file", "weights_file": str(w2), "input_size": 16},
                      {"name": "rand", "arch": "test_resnet", "weights": "random", "input_size": 16}],
           "datasets": [{"name": "digits", "image_size": 16, "test_fraction": 0.75}],  # ~450 trainval images
           "regimes": {"linear_probe": {"grid": {"l2": [0.1]}}},
           "estimators": ["logme", "leep"]}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(spec_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    paths = StorageLayout(tmp_path / "store", tmp_path / "data")
    tracker = SweepTracker(uri, "est")
    tracker.start_parent({"sweep": "est"})
    out = io.StringIO()
    assert run_estimates(spec, paths, tracker, stream=out) == (3, 3)
    assert "3 to run" in out.getvalue()

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("est").experiment_id

    def estimate_runs():
        return [r for r in client.search_runs([exp]) if r.data.tags.get("xfer.kind") == "estimate"]

    runs = {r.data.tags["xfer.model"]: r for r in estimate_runs()}
    assert set(runs) == {"src1", "src2", "rand"}
    for name, r in runs.items():
        assert "xfer.trial_key" not in r.data.tags  # not a trial: the runs table never sees it
        assert r.data.tags["xfer.estimate_key"] == estimate_key(spec.model(name), spec.datasets[0])
        assert r.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert math.isfinite(r.data.metrics["estimate.logme"]) and r.data.metrics["estimate.logme.seconds"] > 0
        assert r.data.params["split"] == "trainval" and 400 < int(r.data.params["n"]) < 500
    assert -math.log(10) < runs["src1"].data.metrics["estimate.leep"] < 0  # digits: 10 balanced classes
    assert runs["src1"].data.metrics["estimate.source_seconds"] > 0
    assert "estimate.leep" not in runs["rand"].data.metrics
    assert "random weights" in runs["rand"].data.tags["xfer.estimate.leep"]

    # the same sweep again: nothing computed, no new run
    out = io.StringIO()
    assert run_estimates(spec, paths, tracker, stream=out) == (3, 0)
    assert "3 done, 0 to run" in out.getvalue() and len(estimate_runs()) == 3
    # one more estimator: computed into the same runs, the old scores kept
    spec2 = load_spec(spec_path.write_text(yaml.safe_dump({**raw, "estimators": ["logme", "leep", "nce"]})) and spec_path)
    assert run_estimates(spec2, paths, tracker, stream=io.StringIO()) == (3, 3)
    again = {r.data.tags["xfer.model"]: r for r in estimate_runs()}
    assert {r.info.run_id for r in again.values()} == {r.info.run_id for r in runs.values()}
    assert again["src1"].data.metrics["estimate.logme"] == runs["src1"].data.metrics["estimate.logme"]
    assert "estimate.nce" in again["src2"].data.metrics and "xfer.estimate.nce" in again["rand"].data.tags

    table = load_estimates(uri, "est")
    assert sorted(table["estimator"].unique()) == ["leep", "logme", "nce"]
    assert len(table) == 3 + 2 + 2  # logme for all three; leep and nce only with a source head
    assert set(table[table["estimator"] == "leep"]["needs_source"]) == {True}
