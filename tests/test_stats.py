"""Statistics (xfer/stats.py) against scipy references and hand-worked examples."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from xfer import stats


# ------------------------------------------------------------------ log-odds
def test_logit_matches_the_definition_and_clips():
    p = np.array([0.1, 0.5, 0.9, 0.99])
    np.testing.assert_allclose(stats.logit(p), np.log(p / (1 - p)))
    assert stats.logit(0.5) == 0.0 and isinstance(stats.logit(0.5), float)
    # clipped away from 0 and 1: default eps, or half an example when n is known
    assert stats.logit(1.0) == pytest.approx(math.log((1 - 1e-4) / 1e-4))
    assert stats.logit(0.0) == pytest.approx(-math.log((1 - 1e-4) / 1e-4))
    n = 50
    assert stats.logit(1.0, n=n) == pytest.approx(math.log((1 - 0.01) / 0.01))
    # ordering is kept: 0/n < 1/n and (n-1)/n < n/n
    assert stats.logit(0.0, n=n) < stats.logit(1 / n, n=n) < stats.logit((n - 1) / n, n=n) < stats.logit(1.0, n=n)
    assert stats.logit(0.3, eps=0.4) == pytest.approx(math.log(0.4 / 0.6))
    assert math.isnan(stats.logit(float("nan")))
    np.testing.assert_allclose(stats.expit(stats.logit(p)), p)


@pytest.mark.parametrize("bad", [1.2, -0.1, [0.5, 76.1]])
def test_logit_rejects_non_fractions(bad):
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        stats.logit(bad)


def test_logit_rejects_bad_eps_and_n():
    with pytest.raises(ValueError, match="eps"):
        stats.logit(0.5, eps=0.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        stats.logit(0.5, n=0)


# ------------------------------------------------------------------ correlations
def _xy(n=12, seed=3, noise=0.3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.6, 0.85, n)
    return x, 5 * x + rng.normal(0, noise, n)


def test_correlate_matches_scipy():
    x, y = _xy()
    c = stats.correlate(x, y, n_boot=2000, seed=0)
    ref_p, ref_s = sps.pearsonr(x, y), sps.spearmanr(x, y)
    assert c.r == pytest.approx(np.corrcoef(x, y)[0, 1]) == pytest.approx(ref_p.statistic)
    assert c.p == pytest.approx(ref_p.pvalue)
    assert c.rho == pytest.approx(ref_s.statistic) and c.rho_p == pytest.approx(ref_s.pvalue)
    assert c.n == 12 and c.ci_low <= c.r <= c.ci_high and -1 <= c.ci_low < c.ci_high <= 1


def test_bootstrap_is_seeded_and_resamples_pairs():
    x, y = _xy(noise=1.0)
    a = stats.correlate(x, y, n_boot=3000, seed=7)
    b = stats.correlate(x, y, n_boot=3000, seed=7)
    c = stats.correlate(x, y, n_boot=3000, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    # the vectorised bootstrap equals a plain loop over the same resampling indices
    boot = stats.bootstrap_pearson(x, y, n_boot=50, seed=1)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(x), size=(50, len(x)))
    ref = [np.corrcoef(x[i], y[i])[0, 1] if np.ptp(x[i]) > 0 else np.nan for i in idx]
    np.testing.assert_allclose(boot, ref, rtol=1e-10)
    # the percentile CI is the percentiles of those resamples
    boot = stats.bootstrap_pearson(x, y, n_boot=3000, seed=7)
    assert (a.ci_low, a.ci_high) == pytest.approx(tuple(np.nanpercentile(boot, [2.5, 97.5])))


def test_correlate_degenerate_inputs_give_nan():
    c = stats.correlate([0.1, 0.2], [1.0, 2.0])
    assert c.n == 2 and math.isnan(c.r) and math.isnan(c.ci_low)
    assert math.isnan(stats.correlate([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]).r)
    # NaN pairs are dropped
    assert stats.correlate([0.1, 0.2, np.nan, 0.4], [1.0, 2.5, 3.0, 3.9], n_boot=0).n == 3
    with pytest.raises(ValueError, match="same length"):
        stats.correlate([1, 2, 3], [1, 2])


def _results(models, datasets, regimes, value_fn, source):
    return pd.DataFrame([{"model": m, "dataset": d, "regime": r, "source_top1": source[m], "metric": "top1",
                          "value": value_fn(m, d, r)} for r in regimes for m in models for d in datasets])


def test_headline_is_r_of_source_vs_mean_log_odds():
    rng = np.random.default_rng(0)
    models = [f"m{i}" for i in range(6)]
    source = dict(zip(models, np.linspace(0.65, 0.8, 6)))
    vals = {(m, d, r): float(rng.uniform(0.3, 0.95)) for m in models for d in "abcd" for r in ("finetune", "scratch")}
    res = _results(models, list("abcd"), ["scratch", "finetune"], lambda m, d, r: vals[(m, d, r)], source)
    head = stats.headline(res, n_boot=500)
    assert list(head) == ["finetune", "scratch"]  # the paper's order
    for r in head:
        mean = [np.mean([math.log(vals[(m, d, r)] / (1 - vals[(m, d, r)])) for d in "abcd"]) for m in models]
        assert head[r]["r"] == pytest.approx(np.corrcoef([source[m] for m in models], mean)[0, 1])
        assert head[r]["n_models"] == 6 and head[r]["n_datasets"] == 4
        lo, hi = head[r]["ci"]
        assert lo <= head[r]["r"] <= hi


def test_headline_leaves_out_incomplete_models_and_says_so():
    models = ["a", "b", "c", "d", "e"]
    source = {"a": 0.6, "b": 0.7, "c": 0.8, "d": 0.75, "e": math.nan}
    res = _results(models, ["x", "y", "z"], ["finetune"], lambda m, d, r: 0.5 + 0.1 * "abcde".index(m), source)
    res.loc[(res.model == "c") & (res.dataset == "x"), "value"] = np.nan
    head = stats.headline(res, n_boot=0)["finetune"]
    # e has no source accuracy; c misses 1/3 of its datasets, x misses 1/4 of its models: c goes
    assert head["excluded_models"] == {"e": "no source top-1", "c": "missing results"}
    assert head["excluded_datasets"] == {}
    assert head["models"] == ["a", "b", "d"] and head["n_models"] == 3 and head["n_datasets"] == 3
    # a tie in missing fraction drops the dataset: the correlation is over models
    res2 = res[res.model != "d"]
    head2 = stats.headline(res2, n_boot=0)["finetune"]
    assert head2["excluded_datasets"] == {"x": "missing results"} and head2["n_models"] == 3


def test_complete_block_greedy():
    m = pd.DataFrame([[1, 2, np.nan], [1, np.nan, np.nan], [1, 2, 3], [1, 2, 3]], index=list("ABCD"),
                     columns=list("xyz"), dtype=float)
    block, dm, dd = stats.complete_block(m)
    assert dm == ["B"] and dd == ["z"] and list(block.index) == ["A", "C", "D"] and list(block.columns) == ["x", "y"]
    assert not block.isna().any().any()


def test_per_dataset_correlations_match_scipy():
    models = [f"m{i}" for i in range(5)]
    source = dict(zip(models, [0.70, 0.72, 0.75, 0.79, 0.81]))
    v = {("m0", "x"): 0.6, ("m1", "x"): 0.65, ("m2", "x"): 0.61, ("m3", "x"): 0.7, ("m4", "x"): 0.8,
         ("m0", "y"): 0.9, ("m1", "y"): 0.85, ("m2", "y"): 0.93, ("m3", "y"): 0.92, ("m4", "y"): 0.95}
    res = _results(models, ["x", "y"], ["linear_probe"], lambda m, d, r: v[(m, d)], source)
    pdc = stats.per_dataset_correlations(res, n_boot=200).set_index("dataset")
    for d in ("x", "y"):
        y = [math.log(v[(m, d)] / (1 - v[(m, d)])) for m in models]
        ref = sps.pearsonr([source[m] for m in models], y)
        assert pdc.loc[d, "r"] == pytest.approx(ref.statistic) and pdc.loc[d, "p"] == pytest.approx(ref.pvalue)
        assert pdc.loc[d, "rho"] == pytest.approx(sps.spearmanr([source[m] for m in models], y).statistic)


def test_fit_line_band_matches_the_textbook_formula():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 5.0])
    fit, lo, hi = stats.fit_line(x, y, np.array([2.5, 4.0]))
    # x̄ = 2.5, ȳ = 2.75, Sxx = 5, Sxy = 5.5 → slope 1.1, intercept 0; fitted 1.1, 2.2, 3.3, 4.4
    resid = y - np.array([1.1, 2.2, 3.3, 4.4])
    s = math.sqrt((resid ** 2).sum() / 2)
    t = 4.302652729911275  # t_{0.975, 2}
    assert fit == pytest.approx([2.75, 4.4])
    assert (hi - fit) == pytest.approx([t * s * math.sqrt(1 / 4), t * s * math.sqrt(1 / 4 + 1.5 ** 2 / 5)])
    assert (fit - lo) == pytest.approx(hi - fit)


# ------------------------------------------------------------------ within-subject intervals
def test_morey_intervals_by_hand_3_models_2_datasets():
    m = pd.DataFrame({"d1": [1.0, 2.0, 3.0], "d2": [2.0, 4.0, 3.0]}, index=["A", "B", "C"])
    out = stats.within_subject_intervals(m)
    # dataset means 2 and 3, grand mean 2.5 → normalised A: 1.5, 1.5; B: 2.5, 3.5; C: 3.5, 2.5
    # sd: A 0, B and C sqrt(0.5); se = sd / sqrt(2 datasets) = 0.5; Morey factor sqrt(3/2); t_{.975,1} = 12.7062
    t = 12.706204736174698
    assert list(out["mean"]) == [1.5, 3.0, 3.0]
    assert out.loc["A", "half_width"] == pytest.approx(0.0, abs=1e-12)
    assert out.loc["B", "half_width"] == pytest.approx(t * math.sqrt(1.5) * 0.5)
    assert out.loc["C", "half_width"] == pytest.approx(t * math.sqrt(1.5) * 0.5)
    assert out.loc["B", "low"] == pytest.approx(3.0 - t * math.sqrt(1.5) * 0.5)
    assert (out["n_datasets"] == 2).all()


def test_morey_intervals_ignore_dataset_difficulty():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, size=(4, 6))
    shifted = base + np.array([0, 5, -3, 10, 2, 1])  # datasets differ hugely in difficulty
    a = stats.within_subject_intervals(pd.DataFrame(base))
    b = stats.within_subject_intervals(pd.DataFrame(shifted))
    np.testing.assert_allclose(a["half_width"], b["half_width"])


def test_morey_intervals_need_a_complete_matrix():
    with pytest.raises(ValueError, match="complete"):
        stats.within_subject_intervals(pd.DataFrame({"x": [1.0, np.nan], "y": [1.0, 2.0]}))
    with pytest.raises(ValueError, match=">= 2 models"):
        stats.within_subject_intervals(pd.DataFrame({"x": [1.0], "y": [1.0]}))


# ------------------------------------------------------------------ significance
@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (3, 4), (10, 2), (40, 25), (1, 30)])
def test_mcnemar_exact_equals_binomtest_on_discordant_pairs(b, c):
    n_same = 17
    a = np.array([1] * b + [0] * c + [1] * n_same + [0] * 5, dtype=bool)
    bb = np.array([0] * b + [1] * c + [1] * n_same + [0] * 5, dtype=bool)
    p, nb, nc = stats.mcnemar_exact(a, bb)
    assert (nb, nc) == (b, c)
    ref = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert p == pytest.approx(ref)


def _accuracy(scores, targets):
    return float((np.asarray(scores).argmax(1) == targets).mean())


def test_permutation_test_agrees_with_the_exact_sign_test_for_accuracy():
    # for plain accuracy the permutation distribution is the sign test on discordant pairs
    rng = np.random.default_rng(0)
    n = 120
    targets = rng.integers(0, 3, n)
    right = np.eye(3)[targets]
    wrong = np.eye(3)[(targets + 1) % 3]
    a_ok = rng.random(n) < 0.8
    b_ok = a_ok.copy()
    flip = rng.choice(n, 20, replace=False)
    b_ok[flip[:14]] = ~b_ok[flip[:14]]
    sa = np.where(a_ok[:, None], right, wrong)
    sb = np.where(b_ok[:, None], right, wrong)
    p_exact, b, c = stats.mcnemar_exact(a_ok, b_ok)
    p_perm, diff = stats.paired_permutation_test(sa, sb, targets, _accuracy, n_permutations=4000, seed=0)
    assert diff == pytest.approx(a_ok.mean() - b_ok.mean())
    assert abs(p_perm - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / 4000) + 2e-3
    # identical predictions: nothing to distinguish
    assert stats.paired_permutation_test(sa, sa, targets, _accuracy, n_permutations=200)[0] == 1.0
    # the same seed gives the same p
    assert stats.paired_permutation_test(sa, sb, targets, _accuracy, n_permutations=300, seed=5)[0] == \
        stats.paired_permutation_test(sa, sb, targets, _accuracy, n_permutations=300, seed=5)[0]


def _preds(correct, targets, n_classes=4):
    targets = np.asarray(targets)
    pred = np.where(correct, targets, (targets + 1) % n_classes)
    return np.eye(n_classes)[pred] + 0.01, targets


def test_not_worse_than_best_on_a_constructed_example():
    rng = np.random.default_rng(1)
    n = 200
    t = rng.integers(0, 4, n)
    best_ok = np.arange(n) < 180  # 90%
    close_ok = best_ok.copy()
    close_ok[[0, 1, 2]] = False  # 3 discordant pairs: not significant
    close_ok[190] = True
    bad_ok = np.arange(n) < 120  # 60%: 60 discordant, all for the best
    preds = {("best", "ds", "finetune"): _preds(best_ok, t), ("close", "ds", "finetune"): _preds(close_ok, t),
             ("bad", "ds", "finetune"): _preds(bad_ok, t), ("nopred", "ds", "finetune"): None}
    res = pd.DataFrame({"model": ["best", "close", "bad", "nopred"], "dataset": "ds", "regime": "finetune",
                        "source_top1": [0.8, 0.7, 0.6, 0.5], "metric": "top1",
                        "value": [best_ok.mean(), close_ok.mean(), bad_ok.mean(), 0.5]})
    out = stats.not_worse_than_best(res, preds).set_index("model")
    assert out.loc["best", "is_best"] and out.loc["best", "not_worse"]
    assert out.loc["close", "test"] == "mcnemar_exact"
    assert out.loc["close", "p_value"] == pytest.approx(sps.binomtest(1, 4, 0.5).pvalue)
    assert out.loc["close", "not_worse"]
    assert out.loc["bad", "p_value"] == pytest.approx(sps.binomtest(0, 60, 0.5).pvalue)
    assert not out.loc["bad", "not_worse"]
    assert pd.isna(out.loc["nopred", "not_worse"]) and pd.isna(out.loc["nopred", "test"])
    assert (out["best_model"] == "best").all()


def test_not_worse_than_best_multilabel_uses_the_permutation_test():
    rng = np.random.default_rng(2)
    n, k = 150, 5
    targets = (rng.random((n, k)) < 0.3).astype(float)
    good = targets * 2 - 1 + rng.normal(0, 0.5, (n, k))
    noisy = targets * 2 - 1 + rng.normal(0, 3.0, (n, k))

    def label_acc(scores, tgt):  # per-label accuracy: a simple multi-label metric for the test
        return float(((np.asarray(scores) > 0) == (tgt > 0.5)).mean())

    res = pd.DataFrame({"model": ["good", "noisy"], "dataset": "voc", "regime": "linear_probe",
                        "source_top1": [0.8, 0.7], "metric": "label_acc",
                        "value": [label_acc(good, targets), label_acc(noisy, targets)]})
    preds = {("good", "voc", "linear_probe"): (good, targets), ("noisy", "voc", "linear_probe"): (noisy, targets)}
    seen = []
    out = stats.not_worse_than_best(res, preds, n_permutations=300,
                                    metric_fn=lambda name: seen.append(name) or label_acc).set_index("model")
    assert seen == ["label_acc"]
    assert out.loc["noisy", "test"] == "permutation(label_acc)"
    assert out.loc["noisy", "p_value"] == pytest.approx(1 / 301) and not out.loc["noisy", "not_worse"]


def test_not_worse_than_best_refuses_unpaired_predictions():
    t = np.arange(10) % 3
    preds = {("a", "d", "r"): _preds(np.ones(10, bool), t), ("b", "d", "r"): _preds(np.ones(10, bool), t[::-1])}
    res = pd.DataFrame({"model": ["a", "b"], "dataset": "d", "regime": "r", "source_top1": [0.5, 0.6],
                        "metric": "top1", "value": [0.9, 0.8]})
    with pytest.raises(ValueError, match="different test examples"):
        stats.not_worse_than_best(res, preds)


# ------------------------------------------------------------------ regime comparison
def test_regime_comparison_log_odds_differences():
    source = {"a": 0.7, "b": 0.8}
    vals = {("a", "finetune"): 0.9, ("a", "linear_probe"): 0.8, ("a", "scratch"): 0.6,
            ("b", "finetune"): 0.95, ("b", "linear_probe"): 0.9, ("b", "scratch"): 0.5}
    res = _results(["a", "b"], ["x"], ["scratch", "linear_probe", "finetune"], lambda m, d, r: vals[(m, r)], source)
    res = res[~((res.model == "b") & (res.regime == "scratch"))]
    comp = stats.regime_comparison(res).set_index(["dataset", "model"])
    lg = lambda p: math.log(p / (1 - p))
    assert comp.loc[("x", "a"), "finetune - linear_probe"] == pytest.approx(lg(0.9) - lg(0.8))
    assert comp.loc[("x", "a"), "finetune - scratch"] == pytest.approx(lg(0.9) - lg(0.6))
    assert comp.loc[("x", "a"), "linear_probe - scratch"] == pytest.approx(lg(0.8) - lg(0.6))
    assert comp.loc[("x", "b"), "acc_finetune"] == 0.95
    assert math.isnan(comp.loc[("x", "b"), "finetune - scratch"])  # missing stays visible as NaN


def test_source_top1_must_be_one_value_per_model():
    res = pd.DataFrame({"model": ["a", "a"], "dataset": ["x", "y"], "regime": "finetune",
                        "source_top1": [0.7, 0.8], "metric": "top1", "value": [0.5, 0.6]})
    with pytest.raises(ValueError, match="differs across rows of model 'a'"):
        stats.source_top1_by_model(res)


def test_bootstrap_ignores_resamples_of_two_distinct_points():
    """With 4 models a third of the resamples hold only 2 distinct points (r = ±1 by construction);
    they must not pin the interval to [-1, 1]."""
    x = np.array([0.2, 0.35, 0.5, 0.7])
    y = np.array([0.1, 0.9, 0.6, 1.5])
    boots = stats.bootstrap_pearson(x, y, n_boot=4000, seed=0)
    finite = boots[np.isfinite(boots)]
    assert len(finite) < len(boots)  # degenerate resamples were dropped
    assert not np.any(np.isclose(np.abs(finite), 1.0))
    c = stats.correlate(x, y, n_boot=4000, seed=0)
    assert -1.0 < c.ci_low < c.r < c.ci_high < 1.0


# ------------------------------------------------------------------ shared results and stand-ins
def _shared_table():
    """Five models; s1, s2 and s3 share one scratch run per dataset (same architecture and preprocessing),
    s1 and s2 are stand-ins."""
    source = {"a": 0.70, "b": 0.74, "s1": 0.77, "s2": 0.776, "s3": 0.779}
    rows = []
    for d in ["x", "y", "z"]:
        for m, src in source.items():
            shared = m.startswith("s")
            value = 0.61 + 0.01 * "xyz".index(d) if shared else 0.3 + 0.4 * (src - 0.7) + 0.02 * "xyz".index(d)
            rows.append({"model": m, "dataset": d, "regime": "scratch", "source_top1": src, "metric": "top1",
                         "value": value, "run_id": f"run-s-{d}" if shared else f"run-{m}-{d}",
                         "stand_in": m in ("s1", "s2")})
    return pd.DataFrame(rows), source


def test_shared_groups_follow_run_ids():
    res, _ = _shared_table()
    assert stats.shared_groups(res, "scratch") == [["a"], ["b"], ["s1", "s2", "s3"]]
    assert stats.shared_groups(res.drop(columns="run_id"), "scratch") == [["a"], ["b"], ["s1"], ["s2"], ["s3"]]
    assert stats.stand_ins(res) == ["s1", "s2"]
    assert stats.stand_ins(res.assign(stand_in=["true" if m == "a" else "" for m in res.model])) == ["a"]


def test_a_shared_result_is_one_point_and_stand_ins_get_their_own_r():
    res, source = _shared_table()
    h = stats.headline(res, n_boot=0)["scratch"]
    assert h["n_models"] == 3 and h["n_entries"] == 5
    assert h["shared"] == {"s1 = s2 = s3": ["s1", "s2", "s3"]}
    point = h["points"]["s1 = s2 = s3"]
    assert point["source_top1"] == pytest.approx(np.mean([0.77, 0.776, 0.779]))
    mean = {m: np.mean([stats.logit(v) for v in res[res.model == m]["value"]]) for m in source}
    x = [source["a"], source["b"], point["source_top1"]]
    assert h["r"] == pytest.approx(np.corrcoef(x, [mean["a"], mean["b"], mean["s3"]])[0, 1])
    # counted five times (the old behaviour) the shared run would weigh three times as much: a different r
    five = np.corrcoef(list(source.values()), [mean[m] for m in source])[0, 1]
    assert abs(five - h["r"]) > 1e-3
    assert h["stand_ins"] == ["s1", "s2"]
    w = h["without_stand_ins"]
    assert w["models"] == ["a", "b", "s3"] and w["shared"] == {} and w["n_models"] == 3
    assert w["r"] == pytest.approx(np.corrcoef([0.70, 0.74, 0.779], [mean["a"], mean["b"], mean["s3"]])[0, 1])
    assert "without_stand_ins" not in stats.headline(res.drop(columns="stand_in"), n_boot=0)["scratch"]
    pdc = stats.per_dataset_correlations(res, n_boot=0).set_index("dataset")
    assert (pdc["n_models"] == 3).all() and (pdc["n_without_stand_ins"] == 3).all()
