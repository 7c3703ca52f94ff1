"""A new regime is one module: the plugin in tests/plugins/knn_regime.py has an axis (``neighbours``)
that no shipped regime has, and goes through spec → sweep (real local Ray, trial processes) → MLflow
(SQLite) → selection → report without any xfer module naming it."""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

PLUGINS = Path(__file__).parent / "plugins"
SPEC = {
    "name": "knn-study",
    "plugins": ["knn_regime"],
    "models": [{"name": "any-a", "arch": "test_resnet", "weights": "random", "source_top1": 0.3},
               {"name": "any-b", "arch": "test_byobnet", "weights": "random", "source_top1": 0.6}],
    "datasets": [{"name": "digits", "image_size": 8}],
    "regimes": {"knn": {"grid": {"neighbours": [1, 3, 9]}, "max_train": 400}},
    "resources": {"knn": {"cpu": 1}},
}


@pytest.fixture(scope="module")
def plugin_path():
    sys.path.insert(0, str(PLUGINS))
    yield
    sys.path.remove(str(PLUGINS))


def test_spec_validation_reads_the_plugins_axis(plugin_path):
    from xfer.spec import SpecError, parse_spec

    spec = parse_spec(SPEC)
    trials = spec.grid_trials()
    assert sorted(t.hparams["neighbours"] for t in trials) == [1, 1, 3, 3, 9, 9]
    # model_identity = (): both model entries share each grid point's trial
    assert len({t.key for t in trials}) == 3
    bad = {**SPEC, "regimes": {"knn": {"grid": {"neighbours": [2.5]}}}}
    with pytest.raises(SpecError, match=r"spec.regimes.knn.grid.neighbours: values must be a whole number >= 1"):
        parse_spec(bad)
    with pytest.raises(SpecError, match=r"spec.plugins\[0\]: cannot import plugin module 'no_such_plugin'"):
        parse_spec({**SPEC, "plugins": ["no_such_plugin"]})


def test_xfer_trial_gets_the_axis_as_a_flag(plugin_path, tmp_path, capsys):
    from xfer.cli import main

    rc = main(["--plugin", "knn_regime", "trial", "--model", "test_resnet", "--dataset", "digits",
               "--dataset-option", "image_size=8", "--regime", "knn", "--neighbours", "3", "--option",
               "max_train=200", "--storage", str(tmp_path / "s"), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert '"status": "finished"' in out and "val_top1" in out
    assert main(["--plugin", "knn_regime", "trial", "--model", "test_resnet", "--dataset", "digits",
                 "--regime", "knn", "--lr", "0.1", "--storage", str(tmp_path / "s")]) == 2
    assert "--lr does not apply to regime 'knn'; its hyper-parameters: --neighbours" in capsys.readouterr().err


@pytest.mark.integration
def test_sweep_mlflow_selection_and_report(plugin_path, tmp_path, monkeypatch):
    import ray

    from xfer.spec import load_spec
    from xfer.sweep import run_sweep

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS)}})
    try:
        path = tmp_path / "knn.yaml"
        path.write_text(yaml.safe_dump({**SPEC, "storage": str(tmp_path / "store"), "data_root": str(tmp_path)}))
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        out = io.StringIO()
        result = run_sweep(load_spec(path), tracking_uri=uri, report_dir=str(tmp_path / "report"), stream=out)
    finally:
        ray.shutdown()
    log = out.getvalue()
    assert "grid: 3 trials (6 cells share 3 trials)" in log, log
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("knn-study")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "xfer.trial_key" in r.data.tags]
    grid = [r for r in runs if r.data.tags["xfer.stage"] == "grid"]
    assert len(grid) == 3 and sorted(float(r.data.params["neighbours"]) for r in grid) == [1.0, 3.0, 9.0]
    assert all(r.data.tags["xfer.status"] == "finished" for r in runs)

    from xfer import tracking
    from xfer.select import select_best

    table = tracking.load_runs(uri, "knn-study")
    assert "neighbours" in table.columns
    sel = select_best(table)
    assert set(sel["model"]) == {"any-a", "any-b"} and (sel["status"] == "selected").all()
    vals = table[table["stage"] == "grid"].groupby("neighbours")["val"].first()
    best = vals[vals == vals.max()].index.max()  # ties go to more neighbours (the axis prefers larger)
    assert (sel["neighbours"] == best).all()

    results = pd.read_csv(Path(result.report["files"]["results_csv"]))
    assert set(results["regime"]) == {"knn"} and results["value"].between(0, 1).all()
    assert (results["neighbours"] == best).all() and sorted(results["source_top1"]) == [0.3, 0.6]
    html = Path(result.report["files"]["report_html"]).read_text()
    assert "k-nearest neighbours (pixels)" in html  # the regime's own label
    assert not math.isnan(result.report["headline"]["knn"]["r"]) or len(results) < 3
