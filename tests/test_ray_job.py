"""The cluster entry point: `ray job submit --working-dir . -- xfer sweep …` against a real Ray head
started with `ray start --head` on 127.0.0.1, stopped and cleaned up by the test."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head --block` in its own process group: killing the group stops every Ray
    process it started, without touching other Ray instances on the machine (unlike `ray stop`)."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"rj{os.getpid()}"  # Ray's socket paths must stay short
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
           "--object-store-memory=200000000", f"--temp-dir={temp}", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "ray-head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_on_the_cluster(tmp_path, ray_head):
    address, env = ray_head
    spec = {
        "name": "jobsweep",
        "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
        "models": [{"name": "cnx", "arch": "test_convnext", "input_size": 32, "weights": "random"}],
        "datasets": ["digits"],
        "regimes": {"linear_probe": {"grid": {"l2": [1e-3, 1e-1]}},
                    "finetune": {"grid": {"lr": [0.05], "wd": [0.0]}, "steps": 5, "batch_size": 16}},
        "final": {"enabled": False},
    }
    spec_path = tmp_path / "jobsweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    db = tmp_path / "mlflow.db"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--submission-id", "xfer-test-job", "--",
           "xfer", "sweep", str(spec_path), "--tracking-uri", f"sqlite:///{db}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    assert "grid: 3 trials — 0 done, 3 to run" in r.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("jobsweep")
    runs = client.search_runs([exp.experiment_id])
    trials = [x for x in runs if "xfer.trial_key" in x.data.tags]
    assert len(trials) == 3
    assert {x.data.tags["xfer.status"] for x in trials} == {"finished"}
