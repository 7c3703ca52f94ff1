"""Report files, the results CSV format and `--from-csv` (xfer/report.py)."""
from __future__ import annotations

import base64
import json
import logging
import math
import re

import numpy as np
import pandas as pd
import pytest

from xfer import report as rep
from xfer.report import ResultsTableError, build_report, read_results_csv

MODELS = ["tiny", "small", "base", "large", "huge"]
SOURCE = [0.61, 0.68, 0.72, 0.77, 0.80]
DATASETS = ["digits", "synthetic_near", "synthetic_far"]
REGIMES = ["finetune", "linear_probe", "scratch"]


def hand_table() -> pd.DataFrame:
    """5 models × 3 datasets × 3 regimes; accuracies rise with source top-1 (strongly for the transfer
    regimes, noisily for scratch), all away from 0 and 1 so clipping plays no role."""
    rng = np.random.default_rng(11)
    rows = []
    for r, slope, noise in [("finetune", 10, 0.15), ("linear_probe", 14, 0.1), ("scratch", 2, 0.4)]:
        for m, s in zip(MODELS, SOURCE):
            for j, d in enumerate(DATASETS):
                lo = 0.5 * j + slope * (s - 0.7) + rng.normal(0, noise)
                rows.append({"model": m, "dataset": d, "regime": r, "source_top1": s,
                             "metric": "top1", "value": round(1 / (1 + math.exp(-lo)), 4)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def csv_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    table = hand_table()
    csv = tmp / "results.csv"
    table.to_csv(csv, index=False)
    rep = build_report(read_results_csv(csv), tmp / "out")  # what `xfer report --from-csv` does
    out = {"files": {k: str(v) for k, v in rep.files.items()}, "headline": rep.headline,
           "summary": rep.summary_lines()}
    return table, out, tmp


def test_from_csv_writes_all_files(csv_report):
    _, out, tmp = csv_report
    files = {k: tmp / "out" / v.split("/")[-1] for k, v in out["files"].items()}
    for name in ("report_md", "report_html", "results_csv", "headline_json", "fig_correlation",
                 "fig_regime_comparison"):
        assert name in files
    for regime in REGIMES:
        assert f"fig_heatmap_{regime}" in files and f"fig_per_dataset_{regime}" in files
    for name, path in files.items():
        assert path.is_file() and path.stat().st_size > 0, name
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(out["summary"]) == 3 and out["summary"][0].startswith("finetune: r = ")


def test_headline_r_matches_numpy(csv_report):
    table, out, tmp = csv_report
    for regime in REGIMES:
        sub = table[table.regime == regime]
        lo = np.log(sub.value / (1 - sub.value))
        mean = sub.assign(lo=lo).groupby("model")["lo"].mean().reindex(MODELS)
        r = np.corrcoef(SOURCE, mean.to_numpy())[0, 1]
        h = out["headline"][regime]
        assert h["r"] == pytest.approx(r, abs=1e-12)
        assert h["n_models"] == 5 and h["n_datasets"] == 3
        assert h["ci"][0] <= h["r"] <= h["ci"][1]
    assert out["headline"]["linear_probe"]["r"] > 0.9 > out["headline"]["scratch"]["r"]
    on_disk = json.loads((tmp / "out" / "headline.json").read_text())
    assert on_disk["finetune"]["r"] == pytest.approx(out["headline"]["finetune"]["r"])
    md = (tmp / "out" / "report.md").read_text()
    assert f"{out['headline']['finetune']['r']:.3f}" in md


def test_html_is_self_contained(csv_report):
    _, _, tmp = csv_report
    html = (tmp / "out" / "report.html").read_text()
    srcs = re.findall(r"""src=['"]([^'"]*)['"]""", html)
    assert len(srcs) == len(list((tmp / "out").glob("*.png")))
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html and "<link" not in html
    png = base64.b64decode(srcs[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table" in html and "Pearson r" in html


def test_results_csv_round_trip(csv_report):
    table, _, tmp = csv_report
    back = read_results_csv(tmp / "out" / "results.csv")
    pd.testing.assert_frame_equal(back[table.columns].reset_index(drop=True), table, check_dtype=False)


def test_percent_tables_are_detected(tmp_path, caplog):
    table = hand_table()
    pct = table.assign(value=table.value * 100, source_top1=table.source_top1 * 100)
    pct.to_csv(tmp_path / "pct.csv", index=False)
    with caplog.at_level(logging.INFO, logger="xfer.report"):
        back = read_results_csv(tmp_path / "pct.csv")
    assert "percentages" in caplog.text
    np.testing.assert_allclose(back.value, table.value)
    np.testing.assert_allclose(back.source_top1, table.source_top1)


def test_bad_tables_get_clear_errors(tmp_path):
    table = hand_table()
    table.drop(columns=["source_top1", "metric"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ResultsTableError, match=r"missing required column\(s\) source_top1, metric.*"
                                                r"Required: model, dataset, regime, source_top1, metric, value.*"
                                                r"found: model, dataset, regime, value"):
        read_results_csv(tmp_path / "a.csv")
    mixed = table.copy()
    mixed.loc[0, "value"] = 87.0  # one percentage among fractions
    mixed.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ResultsTableError, match=r"'value' must hold fractions.*mixed"):
        read_results_csv(tmp_path / "b.csv")
    pd.concat([table, table.iloc[:1]]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ResultsTableError, match="more than one row.*tiny / digits / finetune"):
        read_results_csv(tmp_path / "c.csv")
    table.assign(value="high").to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ResultsTableError, match="non-numeric"):
        read_results_csv(tmp_path / "d.csv")
    with pytest.raises(ResultsTableError, match="no such results file"):
        read_results_csv(tmp_path / "nope.csv")
    with pytest.raises(ResultsTableError, match="fractions in"):
        build_report(table.assign(value=table.value * 100), tmp_path / "x")  # DataFrames must be fractions


def test_missing_cells_are_shown_and_predictions_mark_significance(tmp_path):
    table = hand_table()
    table.loc[(table.model == "huge") & (table.dataset == "digits") & (table.regime == "scratch"), "value"] = np.nan
    table["status"] = np.where(table.value.isna(), "no_final", "finished")
    # per-example predictions for finetune / digits: large is best, huge ties it, tiny is much worse
    rng = np.random.default_rng(0)
    n = 300
    targets = rng.integers(0, 10, n)
    onehot = np.eye(10)

    def scores(acc):
        ok = rng.random(n) < acc
        return onehot[np.where(ok, targets, (targets + 1) % 10)], targets

    preds = {}
    for m, acc in zip(MODELS, [0.5, 0.7, 0.8, 0.9, 0.89]):
        preds[(m, "digits", "finetune")] = scores(acc)
    ft = (table.dataset == "digits") & (table.regime == "finetune")
    for m in MODELS:
        s, t = preds[(m, "digits", "finetune")]
        table.loc[ft & (table.model == m), "value"] = float((s.argmax(1) == t).mean())
    res = build_report(table, tmp_path / "out", predictions=preds, title="With predictions", n_boot=500)
    md = res["report_md"].read_text()
    assert "## Missing results" in md and "| huge | digits | scratch | no_final |" in md
    assert "mcnemar_exact" in md and "Significance tests" in md
    assert res.headline["scratch"]["excluded_models"] == {"huge": "missing results"}
    assert res.headline["scratch"]["n_models"] == 4 and res.headline["finetune"]["n_models"] == 5
    assert res["fig_heatmap_finetune"].stat().st_size > 0
    assert len(res.summary_lines()) == 3


def test_single_regime_single_dataset_table_still_reports(tmp_path):
    table = hand_table()
    table = table[(table.regime == "linear_probe") & (table.dataset == "digits")]
    res = build_report(table, tmp_path / "one", n_boot=200)
    assert "fig_regime_comparison" not in res.files
    assert res.headline["linear_probe"]["n_models"] == 5
    assert res["report_html"].stat().st_size > 0


def test_validate_results_accepts_optional_columns_and_n_test():
    table = hand_table().assign(n_test=1000, lr=0.01, run_id="r")
    out = rep.validate_results(table)
    assert list(out.columns) == list(table.columns)


# ------------------------------------------------------------------ the public-checkpoint sweep, stand-ins in the open
def public_sweep_table() -> pd.DataFrame:
    """A hand-made results table shaped like sweeps/kornblith2019-public.yaml's (16 entries, its model
    facts, 4 datasets, 3 regimes); scratch rows of entries that share a random-init trial share a run_id."""
    from pathlib import Path

    from xfer.models import source_top1
    from xfer.source_accuracy import model_facts
    from xfer.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "sweeps" / "kornblith2019-public.yaml")
    scratch_key = {t.model.name: t.key for t in spec.grid_trials() if t.regime == "scratch" and t.dataset.name == "cifar10"}
    rng = np.random.default_rng(5)
    rows = []
    for r, slope in [("finetune", 12.0), ("linear_probe", 16.0), ("scratch", 3.0)]:
        for m in spec.models:
            src, facts = source_top1(m), model_facts(m)
            for j, d in enumerate(["cifar10", "dtd", "flowers102", "oxford_pets"]):
                lo = 0.4 * j + slope * (src - 0.77) + rng.normal(0, 0.05)
                if facts["stand_in"] and r != "scratch":
                    lo -= 0.6  # stand-ins transfer worse than their ImageNet accuracy says
                if r == "scratch":  # one run per architecture + preprocessing: shared entries get one value
                    lo = 0.4 * j + 0.1 * (int(scratch_key[m.name], 16) % 7)
                run = f"{r}-{scratch_key[m.name] if r == 'scratch' else m.name}-{d}"
                rows.append({"model": m.name, "dataset": d, "regime": r, "source_top1": src, "metric": "top1",
                             "value": round(1 / (1 + math.exp(-lo)), 4), "run_id": run, **facts,
                             "solver_converged": 1.0 if r == "linear_probe" else math.nan})
    return pd.DataFrame(rows)


def test_public_sweep_report_flags_stand_ins_and_gives_both_r(tmp_path):
    table = public_sweep_table()
    table.loc[table.model == "mobilenet_v1", "input_size"] = 192  # run below the figure's 224 px
    table.loc[(table.model == "resnet50") & (table.regime == "linear_probe") & (table.dataset == "dtd"),
              "solver_converged"] = 0.0
    path = tmp_path / "public.csv"
    table.to_csv(path, index=False)  # the --from-csv path: booleans and sizes come back as text/numbers
    res = build_report(read_results_csv(path), tmp_path / "out", n_boot=200)

    head = json.loads(res["headline_json"].read_text())
    subs = ["bn_inception", "inception_v1", "nasnet_mobile"]
    for regime in ("finetune", "linear_probe", "scratch"):
        h = head[regime]
        assert sorted(h["stand_ins"]) == subs and "without_stand_ins" in h
        assert sorted(h["without_stand_ins"]["models"]) == sorted(set(h["models"]) - set(subs))
    ft = head["finetune"]
    assert ft["n_models"] == ft["n_entries"] == 16 and ft["without_stand_ins"]["n_models"] == 13
    # both r are what they say: recomputed here from the table
    tf = table[table.regime == "finetune"].assign(lo=lambda d: np.log(d.value / (1 - d.value)))
    per = tf.groupby("model").agg(src=("source_top1", "first"), lo=("lo", "mean"))
    keep = per.drop(index=subs)
    assert ft["r"] == pytest.approx(np.corrcoef(per.src, per.lo)[0, 1], abs=2e-3)
    assert ft["without_stand_ins"]["r"] == pytest.approx(np.corrcoef(keep.src, keep.lo)[0, 1], abs=2e-3)
    assert ft["without_stand_ins"]["r"] > ft["r"] + 0.05  # the stand-ins pull r down here
    # random init: three entries are one trial, one point
    sc = head["scratch"]
    assert sc["shared"] == {"inception_v1 = bn_inception = inception_v3": ["inception_v1", "bn_inception", "inception_v3"]}
    assert sc["n_models"] == 14 and sc["n_entries"] == 16

    md = res["report_md"].read_text()
    assert "| finetune | all |" in md and "| finetune | without stand-ins |" in md
    assert "Stand-ins (3): bn_inception runs other weights under the name BN-Inception" in md
    assert "inception_v1 runs other weights under the name Inception v1" in md
    assert "Shared results (counted once): scratch: inception_v1 = bn_inception = inception_v3" in md
    assert "mobilenet_v1: source top-1 measured at 224 px, transfer run at 192 px" in md
    assert "1 of 64 final fits did not converge (stalled or out of iterations): resnet50 / dtd / linear_probe" in md
    assert "| inception_v1 * |" in md  # marked in the per-model table
    models_rows = [ln for ln in md.splitlines() if ln.startswith("| nasnet_mobile | NASNet-A Mobile | yes |")]
    assert len(models_rows) == 1
    assert any("without stand-ins r = " in line for line in res.summary_lines())
    out = pd.read_csv(res["results_csv"])
    assert {"paper_name", "stand_in", "input_size", "source_input_size"} <= set(out.columns)
    assert sorted(out.loc[out.stand_in, "model"].unique()) == subs


def test_per_model_columns_must_agree_and_parse(tmp_path):
    table = public_sweep_table()
    bad = table.copy()
    bad.loc[bad.index[0], "paper_name"] = "Something else"
    with pytest.raises(ResultsTableError, match="'paper_name' differs across rows of model 'inception_v1'"):
        rep.validate_results(bad)
    with pytest.raises(ResultsTableError, match="'stand_in' must be true or false"):
        rep.validate_results(table.assign(stand_in="maybe"))
