"""`xfer sweep` end to end on a real local Ray and a real MLflow (SQLite file): stages, tracking
hierarchy, idempotent reruns, resume after an interruption, and the final stage + report."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from xfer.spec import load_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seeds": [0],
    "models": [
        {"name": "cnx", "arch": "test_convnext", "input_size": 32, "weights": "pretrain",
         "pretrain": {"dataset": "synthetic_source", "steps": 20, "batch_size": 32}},
        {"name": "res", "arch": "test_resnet", "input_size": 32, "weights": "random"},
    ],
    "datasets": ["digits"],
    "regimes": {
        "linear_probe": {"grid": {"l2": [1e-3, 1e-1]}},
        "finetune": {"grid": {"lr": [0.01, 0.05], "wd": [0.0]}, "steps": 8, "batch_size": 16},
        "scratch": {"grid": {"lr": [0.05], "wd": [0.0]}, "steps": 8, "batch_size": 16},
    },
    "resources": {r: {"cpu": 1} for r in ("pretrain", "linear_probe", "finetune", "scratch")},
}
N_GRID = 2 * (2 + 2 + 1)
N_FINAL = 2 * 3


def write_spec(tmp_path: Path, raw: dict) -> Path:
    raw = {**raw, "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child_runs(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("xfer.kind") == "sweep"]
    children = [r for r in runs if "xfer.trial_key" in r.data.tags]
    return parents, children


def test_sweep_tracks_every_trial_once_and_reruns_add_nothing(tmp_path, ray_local):
    from xfer.sweep import run_sweep

    spec = load_spec(write_spec(tmp_path, TINY))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = io.StringIO()
    result = run_sweep(spec, tracking_uri=uri, report_dir=str(tmp_path / "report"), stream=out)
    log = out.getvalue()
    parents, children = child_runs(uri, "tiny")
    assert len(parents) == 1
    keys = [r.data.tags["xfer.trial_key"] for r in children]
    assert len(keys) == len(set(keys)) == 1 + N_GRID + N_FINAL, log
    by_stage = {}
    for r in children:
        t = r.data.tags
        assert t["mlflow.parentRunId"] == parents[0].info.run_id
        for tag in ("xfer.model", "xfer.dataset", "xfer.regime", "xfer.stage", "xfer.status"):
            assert tag in t, tag
        by_stage.setdefault(t["xfer.stage"], []).append(r)
    assert {k: len(v) for k, v in by_stage.items()} == {"pretrain": 1, "grid": N_GRID, "final": N_FINAL}
    # grid trials report validation only; test metrics exist only on final runs
    for r in by_stage["grid"]:
        assert not any(k.startswith("test_") for k in r.data.metrics), r.data.metrics
        if r.data.tags["xfer.status"] == "finished":
            assert any(k.startswith("val_") for k in r.data.metrics)
    for r in by_stage["final"]:
        assert any(k.startswith("test_") for k in r.data.metrics)
        assert not any(k.startswith("val_") for k in r.data.metrics)
    assert "to run" in log and "mlflow ui" in log
    assert result.report and Path(result.report["files"]["report_html"]).exists()
    assert "headline finetune" in log

    # `xfer report --experiment` rebuilds the same results from MLflow alone (no spec, no training)
    import argparse

    import pandas as pd

    from xfer.final import report_cli

    regen = tmp_path / "regen"
    rc = report_cli(argparse.Namespace(experiment="tiny", from_csv=None, tracking_uri=uri, out=str(regen)))
    assert rc == 0 and (regen / "report.html").exists()
    cols = ["model", "dataset", "regime", "value", "source_top1"]
    a = pd.read_csv(result.report["files"]["results_csv"])[cols].sort_values(cols[:3]).reset_index(drop=True)
    b = pd.read_csv(regen / "results.csv")[cols].sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)

    # the same command again: nothing new, and it says so
    out2 = io.StringIO()
    run_sweep(load_spec(write_spec(tmp_path, TINY)), tracking_uri=uri, report_dir=str(tmp_path / "report"),
              stream=out2)
    parents2, children2 = child_runs(uri, "tiny")
    assert len(children2) == len(children)
    assert len(parents2) == 2  # one parent per invocation
    assert f"grid: {N_GRID} trials — {N_GRID} done, 0 to run" in out2.getvalue()

    # adding a model runs only its trials
    bigger = {**TINY, "models": TINY["models"] + [{"name": "vit", "arch": "test_vit", "input_size": 32,
                                                    "weights": "random"}]}
    out3 = io.StringIO()
    run_sweep(load_spec(write_spec(tmp_path, bigger)), tracking_uri=uri, final=False, stream=out3)
    _, children3 = child_runs(uri, "tiny")
    assert len(children3) == len(children) + N_GRID // 2
    assert f"grid: {N_GRID * 3 // 2} trials — {N_GRID} done, {N_GRID // 2} to run" in out3.getvalue()


def test_interrupted_sweep_resumes_to_exactly_one_run_per_key(tmp_path):
    spec_path = write_spec(tmp_path, {**TINY, "regimes": {
        "finetune": {"grid": {"lr": [0.01, 0.02, 0.03, 0.04], "wd": [0.0]}, "steps": 30, "batch_size": 16}}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "xfer.cli", "sweep", str(spec_path), "--tracking-uri", uri, "--no-final"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    seen = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:  # interrupt once the first grid trial has finished
            seen.append(line)
            if line.startswith("[grid 1/"):
                break
            assert time.time() < deadline, "".join(seen)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, before = child_runs(uri, "tiny")
    finished_before = [r for r in before if r.data.tags["xfer.status"] == "finished"
                       and r.data.tags["xfer.stage"] == "grid"]
    assert 1 <= len(finished_before) < 4, "".join(seen)

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    _, after = child_runs(uri, "tiny")
    keys = [x.data.tags["xfer.trial_key"] for x in after]
    assert len(keys) == len(set(keys)) == 1 + 4 * 2
    assert all(x.data.tags["xfer.status"] == "finished" for x in after)


def test_optuna_search_samples_grid_points_per_cell(tmp_path, ray_local):
    from xfer.sweep import run_sweep

    raw = {**TINY, "models": TINY["models"][1:], "final": {"enabled": False},
           "search": {"type": "optuna", "num_samples": 3, "seed": 0},
           "regimes": {"linear_probe": {"grid": {"l2": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}}}}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = io.StringIO()
    run_sweep(load_spec(write_spec(tmp_path, raw)), tracking_uri=uri, stream=out)
    _, children = child_runs(uri, "tiny")
    values = [float(r.data.params["l2"]) for r in children]
    assert 1 <= len(children) <= 3, out.getvalue()  # TPE may sample a point twice: one run per key
    assert set(values) <= {1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    assert len({r.data.tags["xfer.trial_key"] for r in children}) == len(children)
    assert "optuna, 3 per cell" in out.getvalue()


def test_trial_placement_follows_per_model_resources():
    """What Ray is asked for: the model's own GPU share under resources.<regime>.models (packing), the
    regime's otherwise — for one trial and for a batch (a cell's λ path) alike."""
    from xfer.spec import parse_spec
    from xfer.sweep import _resources, trial_configs

    spec = parse_spec({"name": "p", "datasets": ["digits"],
                       "models": [{"name": n, "arch": "test_resnet", "weights": "random", "input_size": 32}
                                  for n in ("small", "big")],
                       "regimes": {"linear_probe": {"grid": {"l2": [1e-3, 1e-1]}}},
                       "resources": {"linear_probe": {"cpu": 2, "gpu": 1, "models": {"small": {"gpu": 0.25}}}}})
    place = _resources(spec)
    bundles = {c["model"]["name"]: place({"trial": c}).bundles for c in trial_configs(spec.grid_trials())}
    assert bundles == {"small": [{"CPU": 2.0, "GPU": 0.25}], "big": [{"CPU": 2.0, "GPU": 1.0}]}
