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
