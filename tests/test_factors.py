"""Factors of transferability as probe axes (Azizpour et al. 2014): the probe's ``layer``, ``pool`` and
``pca`` cell axes, the feature store's variants, and the report's section. Real timm models, real torch,
real files; the end-to-end test runs a sweep through real Ray and a SQLite MLflow store."""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from xfer import features
from xfer.contract import FeatureVariant, RunContext
from xfer.hashing import stable_hash
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelSpec(name="tiny", arch="test_resnet", weights="random", input_size=32)
DATA = DatasetRef("synthetic", {"num_classes": 4, "train_per_class": 20, "test_per_class": 5, "distance": 0.3})
STAGE_CHANNELS = [32, 32, 48, 192, 96]  # test_resnet's feature_info: act1, layer1..layer4


@pytest.fixture
def ctx(tmp_path):
    return RunContext.local(storage=tmp_path / "storage", data_root=tmp_path / "data", device="cpu")


def _images(ctx: RunContext, n: int = 6) -> tuple[torch.nn.Module, torch.Tensor]:
    """The frozen backbone and the first ``n`` val images as the store sees them (eval transform)."""
    from xfer.data import build_from_ref
    from xfer.data.transforms import eval_transform
    from xfer.models import load_backbone

    backbone = load_backbone(MODEL, num_classes=0, ctx=ctx)
    split = build_from_ref(DATA, data_root=ctx.data_root).split("val")
    tf = eval_transform(backbone.data_config)
    return backbone.model.eval(), torch.stack([tf(split[i][0]) for i in range(n)])


def test_stage_features_have_the_stage_width_and_differ_from_the_penultimate(ctx):
    variants = [FeatureVariant(), *(FeatureVariant(k) for k in range(1, 6))]
    sets = features.get_variant_sets(MODEL, DATA, [("val", v) for v in variants], ctx)
    x0 = sets[("val", FeatureVariant())].features
    assert x0.shape[1] == 96
    for k, width in enumerate(STAGE_CHANNELS, 1):
        fs = sets[("val", FeatureVariant(k))]
        assert fs.features.shape == (len(x0), width), k
        assert fs.meta["layer"] == k and fs.meta["num_stages"] == 5 and fs.meta["pool"] == "avg"
        assert torch.isfinite(fs.features).all()
        if width != x0.shape[1]:
            continue
        # layer 5 avg-pools the map the head pools too: it is the penultimate feature, under its own key
        same = torch.allclose(fs.features, x0, atol=1e-5)
        assert same == (k == 5), k
    assert len({fs.key for fs in sets.values()}) == 6
    # the stored stage features are the timm stage map, globally averaged
    model, images = _images(ctx)
    with torch.no_grad():
        _, maps = model.forward_intermediates(images, indices=[1])
    torch.testing.assert_close(sets[("val", FeatureVariant(2))].features[:6], maps[0].mean(dim=(2, 3)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_byobnet"])
def test_the_default_variant_is_the_same_numbers_alone_or_beside_stages(ctx, arch):
    """One pass serves every variant: the penultimate features from ``forward_intermediates`` + the head
    are the model's own output, bit for bit, so an entry under the default key is the same either way."""
    from xfer.data import build_from_ref
    from xfer.models import load_backbone

    backbone = load_backbone(replace(MODEL, arch=arch), num_classes=0, ctx=ctx)
    split = build_from_ref(DATA, data_root=ctx.data_root).split("val")
    run = dict(batch_size=16, device="cpu")
    alone, y1 = features.extract_features(backbone.model, split, backbone.data_config, **run)
    mixed, y2 = features.extract_features(backbone.model, split, backbone.data_config, **run,
                                          variants=[FeatureVariant(), FeatureVariant(2, "max"), FeatureVariant(0, "max")])
    assert torch.equal(alone[FeatureVariant()], mixed[FeatureVariant()]) and torch.equal(y1, y2)
    assert mixed[FeatureVariant(2, "max")].shape[1] == backbone.model.feature_info[1]["num_chs"]


def test_pooling_variants_avg_max_and_both(ctx):
    pools = ("avg", "max", "avgmax")
    pairs = [("val", FeatureVariant(layer, pool)) for layer in (0, 3) for pool in pools]
    sets = features.get_variant_sets(MODEL, DATA, pairs, ctx)
    model, images = _images(ctx)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, indices=[2])
        penultimate = model(images)
    for layer, fmap in ((0, final), (3, maps[0])):
        avg, mx, both = (sets[("val", FeatureVariant(layer, p))].features for p in pools)
        assert both.shape[1] == 2 * avg.shape[1] == 2 * mx.shape[1]
        torch.testing.assert_close(both, torch.cat([avg, mx], dim=1))
        torch.testing.assert_close(mx[:6], fmap.amax(dim=(2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(avg[:6], fmap.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
        assert (mx >= avg - 1e-6).all()
        assert torch.allclose(mx, avg) == (fmap.shape[2:].numel() == 1)  # at 32 px the last map is 1 x 1
    torch.testing.assert_close(sets[("val", FeatureVariant())].features[:6], penultimate, rtol=1e-4, atol=1e-5)


def test_keys_differ_per_variant_and_the_default_key_is_the_one_features_always_had(ctx):
    variants = [FeatureVariant(), FeatureVariant(0, "max"), FeatureVariant(0, "avgmax"), FeatureVariant(2),
                FeatureVariant(2, "max"), FeatureVariant(4, "avgmax")]
    keys = {v: features.feature_key(MODEL, DATA, "train", ctx, v) for v in variants}
    assert len(set(keys.values())) == len(variants)
    assert features.feature_key(MODEL, DATA, "train", ctx) == keys[FeatureVariant()]
    assert features.feature_key(MODEL, DATA, "test", ctx, FeatureVariant(2)) != keys[FeatureVariant(2)]
    # the default key recomputed from what the entry records, by the formula from before variants existed
    fs = features.get_feature_set(MODEL, DATA, "train", ctx)
    m = fs.meta
    old = stable_hash({"backbone": m["backbone_fingerprint"], "dataset": m["dataset_fingerprint"], "split": "train",
                       "data_config": m["data_config"], "precision": m["precision"], "dtype": m["dtype"],
                       "protocol": m["protocol"]}, n=24)
    assert fs.key == old == keys[FeatureVariant()]
    assert "layer" not in m and "pool" not in m  # the default entry's meta is as it was


def test_pca_is_fitted_on_the_training_split_only(ctx):
    from xfer.logistic import PCA
    from xfer.regimes import run_trial

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(200, 12, generator=gen) @ torch.randn(12, 12, generator=gen) + 3.0
    held = torch.randn(50, 12, generator=gen) * 10 - 7.0  # nothing like train: must not move the projection
    pca = PCA.fit(train, 5)
    torch.testing.assert_close(pca.mean, train.double().mean(0))
    torch.testing.assert_close(pca.components.T @ pca.components, torch.eye(5, dtype=torch.float64))
    z = pca(train)
    cov = z.T @ z / (len(z) - 1)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-8)  # decorrelated on train
    assert (torch.diagonal(cov)[:-1] >= torch.diagonal(cov)[1:]).all()  # leading components first
    torch.testing.assert_close(pca(held), (held.double() - train.double().mean(0)) @ pca.components)
    assert PCA.fit(train, 50).components.shape == (12, 12)  # at most as many components as features

    # in the regime: the held-out split's stored features change the score, never the fitted projection
    trial = TrialSpec(model=MODEL, dataset=DATA, regime="linear_probe",
                      hparams={"l2": 0.1, "layer": 2.0, "pool": 2.0, "pca": 8.0}, options={"max_iter": 200})
    first = run_trial(trial, ctx)
    assert first.status == "finished", first.message
    assert first.metrics["pca_components"] == 8 and 0 < first.metrics["pca_explained"] <= 1
    val_key = features.feature_key(MODEL, DATA, "val", ctx, FeatureVariant(2, "avgmax"))
    path = features.feature_path(val_key, ctx)
    entry = torch.load(path, weights_only=True)
    entry["features"] = entry["features"].flip(0) * 3 + 1  # other val features, same file and key
    torch.save(entry, path)
    second = run_trial(trial, ctx)
    assert second.metrics["pca_explained"] == first.metrics["pca_explained"]
    assert second.metrics["train_loss"] == first.metrics["train_loss"]  # the fit saw train alone
    assert second.metrics["val_top1"] != first.metrics["val_top1"] or not np.array_equal(second.scores, first.scores)


def test_an_invalid_layer_names_the_models_stages(ctx):
    from xfer.regimes import run_trial

    msg = (r"model 'tiny' has no feature stage 6; valid layers: 0 \(the penultimate pooled features\), "
           r"1 \(act1, 32 channels\), 2 \(layer1, 32 channels\), 3 \(layer2, 48 channels\), "
           r"4 \(layer3, 192 channels\), 5 \(layer4, 96 channels\)")
    with pytest.raises(features.FeatureStoreError, match=msg):
        features.feature_key(MODEL, DATA, "train", ctx, FeatureVariant(6))
    rec = run_trial(TrialSpec(model=MODEL, dataset=DATA, regime="linear_probe", hparams={"l2": 1.0, "layer": 6.0},
                              options={}), ctx)
    assert rec.status == "failed" and "valid layers: 0 (the penultimate" in rec.message
    assert not list(ctx.layout.features_dir.glob("*.pt"))  # refused before anything was extracted


def test_a_sweep_with_a_layer_a_model_lacks_stops_before_it_starts(tmp_path, capsys):
    from xfer.cli import main

    spec = {"name": "bad-layer", "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
            "models": [{"name": "r", "arch": "test_resnet", "weights": "random"}],
            "datasets": [{"name": "synthetic", "distance": 0.5}],
            "regimes": {"linear_probe": {"grid": {"l2": [1.0], "layer": [0, 6]}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err
    assert "model 'r' has no feature stage 6; valid layers: 0 (the penultimate pooled features), 1 (act1" in err
    assert "Traceback" not in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_spec_names_pooling_and_keeps_default_keys():
    from xfer.regimes import REGIMES
    from xfer.spec import SpecError, parse_spec
    from xfer.tracking.schema import _axis_value, run_name, trial_params

    base = {"name": "f", "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
            "datasets": [{"name": "synthetic", "label": "d", "distance": 0.5}]}

    def spec(grid):
        return parse_spec({**base, "regimes": {"linear_probe": {"grid": grid}}})

    plain = spec({"l2": [0.1]}).grid_trials()
    factors = spec({"l2": [0.1], "layer": [0, 2], "pool": ["avg", "max", "avgmax"], "pca": [0, 16]}).grid_trials()
    assert len(factors) == 12 and {t.hparams["pool"] for t in factors} == {0.0, 1.0, 2.0}
    default = [t for t in factors if (t.hparams["layer"], t.hparams["pool"], t.hparams["pca"]) == (0, 0, 0)]
    assert [t.key for t in default] == [t.key for t in plain]  # the axes at their defaults re-key nothing
    assert len({t.key for t in factors}) == 12
    probe = REGIMES.get("linear_probe")
    odd = next(t for t in factors if (t.hparams["layer"], t.hparams["pool"], t.hparams["pca"]) == (2, 1, 16))
    assert probe.feature_variant(odd) == FeatureVariant(2, "max")
    assert run_name(odd) == "m/d/linear_probe l2=0.1 layer=2 pool=max pca=16"
    params = trial_params(odd)
    assert params["pool"] == "max" and params["layer"] == "2.0"  # readable in MLflow …
    assert _axis_value("linear_probe", "pool", params["pool"]) == 1.0  # … and read back as the index
    with pytest.raises(SpecError, match=r"grid.pool\[1\]: pool must be one of avg, max, avgmax, got 'bogus'"):
        spec({"l2": [0.1], "pool": ["avg", "bogus"]})
    with pytest.raises(SpecError, match=r"grid.pool: a cell axis must include its default avg"):
        spec({"l2": [0.1], "pool": ["max"]})
    with pytest.raises(SpecError, match=r"grid.layer: values must be an integer >= 0"):
        spec({"l2": [0.1], "layer": [0, 1.5]})


def test_xfer_trial_gets_layer_pool_and_pca_flags(tmp_path, capsys):
    from xfer.cli import main

    argv = ["trial", "--model", "test_resnet", "--weights", "random", "--dataset", "synthetic",
            "--dataset-option", "num_classes=4", "--dataset-option", "train_per_class=10",
            "--dataset-option", "test_per_class=3", "--regime", "linear_probe", "--l2", "0.1",
            "--storage", str(tmp_path / "s"), "--data-root", str(tmp_path / "d")]
    rc = main([*argv, "--layer", "2", "--pool", "avgmax", "--pca", "8", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert '"status": "finished"' in out and '"pca_components": 8.0' in out
    assert main([*argv, "--pool", "bogus"]) == 2
    assert "--pool: pool must be one of avg, max, avgmax, got 'bogus'" in capsys.readouterr().err


def _hand_made_results() -> pd.DataFrame:
    """Two models (5 stages each), two synthetic targets (distance 0.1, 0.9) and digits (no distance):
    near targets are best at the penultimate layer, the far one at stage 2; plus a fine-tuning row."""
    rows = []
    for model, top1 in (("a", 0.6), ("b", 0.8)):
        for ds, dist in (("near", 0.1), ("far", 0.9), ("digits", np.nan)):
            for layer in (0, 2, 4):
                for pool in (0, 1, 2):
                    for pca in (0, 16):
                        deep = {0: 1.0, 2: 0.4, 4: 0.8}[layer]
                        score = (0.5 + (0.3 * deep if ds != "far" else 0.3 * (1.2 - deep)) + 0.01 * pool
                                 - 0.02 * (pca > 0))
                        rows.append({"model": model, "dataset": ds, "regime": "linear_probe", "source_top1": top1,
                                     "metric": "top1", "value": score + (top1 - 0.6) / 10, "layer": float(layer),
                                     "pool": float(pool), "pca": float(pca), "source_distance": dist,
                                     "num_stages": 5.0})
            rows.append({"model": model, "dataset": ds, "regime": "finetune", "source_top1": top1, "metric": "top1",
                         "value": 0.7 + top1 / 5, "source_distance": dist})
    return pd.DataFrame(rows)


def test_report_section_from_a_hand_made_results_table(tmp_path):
    from xfer import report_factors
    from xfer.report import build_report
    from xfer.report_curves import main_cells

    res = _hand_made_results()
    rows = report_factors.factor_rows(res)
    assert len(rows) == 2 * 3 * 3 * 3 * 2 and set(rows["regime"]) == {"linear_probe"}
    assert sorted(rows["relative_depth"].unique()) == [0.4, 0.8, 1.0]
    best = report_factors.best_layers(rows)
    by = {(r.model, r.dataset): r for r in best.itertuples(index=False)}
    assert by[("a", "near")].best_layer == 0 and by[("a", "near")].relative_depth == 1.0
    assert by[("b", "far")].best_layer == 2 and by[("b", "far")].relative_depth == 0.4
    assert all(r.pool == 2 and r.pca == 0 for r in best.itertuples())  # the best cell's own pooling and PCA
    assert list(best["dataset"])[:2] == ["near", "near"] and list(best["dataset"])[-1] == "digits"  # by distance
    table = report_factors.accuracy_table(rows)
    assert list(table.columns[-6:]) == ["avg", "max", "avgmax", "avg · pca 16", "max · pca 16", "avgmax · pca 16"]
    assert len(table) == 2 * 3 * 3 and table["layer"].iloc[2] == "0 (penultimate)"
    assert report_factors.factor_rows(main_cells(res)).empty  # no axis with two values: no section

    rep = build_report(res, tmp_path, n_boot=200, title="factors")
    md = rep["report_md"].read_text()
    assert "## Factors of transferability" in md and "fig_factors.png" in md
    assert "Unknown distance from the source (not plotted): digits" in md
    assert rep["fig_factors"].is_file() and rep["fig_factors"].stat().st_size > 5000
    # the main analysis reads the default cells only: one row per model, dataset and regime
    assert rep.headline["linear_probe"]["n_datasets"] == 3 and rep.headline["linear_probe"]["n_models"] == 2
    default = res[(res.regime == "linear_probe") & (res.layer == 0) & (res.pool == 0) & (res.pca == 0)]
    means = default.groupby("model")["value"].mean()
    assert means["b"] > means["a"]


@pytest.mark.integration
def test_sweep_runs_the_factors_and_reports_them(tmp_path, monkeypatch):
    """A small copy of sweeps/factors.yaml (random weights instead of source training, fewer cells)
    through `xfer sweep`'s real path: Ray on 127.0.0.1, MLflow in SQLite, the report's section."""
    import ray

    from xfer.spec import load_spec
    from xfer.sweep import run_sweep

    spec = yaml.safe_load((REPO / "sweeps" / "factors.yaml").read_text())
    small = {"train_per_class": 12, "test_per_class": 4, "num_classes": 4}
    spec.update(storage=str(tmp_path / "store"), data_root=str(tmp_path / "data"),
                models=[{"name": "resnet", "arch": "test_resnet", "input_size": 32, "weights": "random",
                         "source_top1": 0.4},
                        {"name": "byob", "arch": "test_byobnet", "input_size": 32, "weights": "random",
                         "source_top1": 0.5}],
                datasets=[{**d, **small} for d in spec["datasets"][::2]])
    spec["regimes"]["linear_probe"]["grid"] = {"l2": [0.01, 1.0], "layer": [0, 2], "pool": ["avg", "avgmax"],
                                               "pca": [0]}
    spec["regimes"]["linear_probe"]["max_iter"] = 100
    path = tmp_path / "factors.yaml"
    path.write_text(yaml.safe_dump(spec))
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             _node_ip_address="127.0.0.1")
    try:
        out = io.StringIO()
        result = run_sweep(load_spec(path), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                           report_dir=str(tmp_path / "report"), stream=out)
    finally:
        ray.shutdown()
    log = out.getvalue()
    # one task per model × dataset extracts its 4 variants (layer 0/2 × avg/avgmax) for the 4 splits
    assert "features: computing 16 frozen-feature sets (4 model × dataset pairs)" in log, log
    assert len(list((tmp_path / "store" / "features").glob("*.pt"))) == 4 * 4 * 4
    results = pd.read_csv(result.report["files"]["results_csv"])
    probe = results[results.regime == "linear_probe"]
    assert len(probe) == 2 * 2 * 4 and probe["value"].between(0, 1).all()
    assert sorted(probe["source_distance"].unique()) == [0.1, 0.9]
    md = Path(result.report["files"]["report_md"]).read_text()
    assert "## Factors of transferability" in md and "fig_factors.png" in md
    assert Path(result.report["files"]["fig_factors"]).stat().st_size > 5000
