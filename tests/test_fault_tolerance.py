"""Faults during a sweep, with real processes: a local Ray cluster of separate `ray start` nodes on
127.0.0.1, `xfer sweep` as a subprocess against it, MLflow in a SQLite file. Nothing that fails is mocked:

* worker loss: the worker node running a fine-tune trial is SIGKILLed (its whole process group:
  raylet, agents, the trial's worker) after the trial's first periodic checkpoint; a new worker node
  joins; Tune's one retry (``FailureConfig(max_failures=1)``) runs the trial again, and it goes on from
  its checkpoint on the shared storage (``resumed_from_step`` > 0) into the same MLflow run.
* driver loss: the `xfer sweep` process group is SIGKILLed after one trial has finished and a second
  has a checkpoint; the same command again (plain, and with ``--resume``) finishes the rest, never runs
  the finished trial again, and the killed trial goes on from its checkpoint.

Each test prints its timings (``pytest -s``)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 0.2, proc: subprocess.Popen | None = None,
              log: Path | None = None):
    """Poll ``check()`` until it returns something truthy; fail (with the log's tail) after ``timeout``
    or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(every)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what} (process rc={proc.poll() if proc else None})\n{tail}")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Cluster:
    """`ray start --block` nodes, each in its own session, so that one node (raylet, its agents and the
    workers it started) can be SIGKILLed as a group without touching the others or any other Ray on
    the machine (`ray stop` cannot target one node)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path("/tmp") / f"rf{os.getpid()}"  # Ray's socket paths must stay short
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    # this checkout's xfer, in the driver and in every worker (the venv's editable
                    # install may point at another checkout)
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = self.tmp_path / f"{name}.log"
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--object-store-memory=80000000", *args],
                                env=self.env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes.append(proc)
        wait_for(f"{name} to start", lambda: "Ray runtime started" in log.read_text(errors="replace"), 120,
                 every=0.5, proc=proc, log=log)
        return proc

    def start_head(self) -> None:
        # no CPUs on the head: trials run on worker nodes only
        self._start(["--head", f"--port={self.port}", "--num-cpus=0", f"--temp-dir={self.temp}",
                     "--include-dashboard=false"], "head")

    def add_worker(self, name: str) -> subprocess.Popen:
        return self._start([f"--address={self.address}", "--num-cpus=1"], name)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's whole process group and wait until none of it is left."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_for(f"process group {proc.pid} to be gone", lambda: not _alive(proc.pid), 30)

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            if _alive(proc.pid):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.nodes):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            if _alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    t0 = time.monotonic()
    try:
        c.start_head()
        c.add_worker("worker1")
        print(f"\n[timing] cluster up in {time.monotonic() - t0:.1f}s")
        yield c
    finally:
        c.stop()


def write_spec(tmp_path: Path, lrs: list[float], steps: int) -> Path:
    raw = {"name": NAME, "seeds": [0], "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data"),
           "models": [{"name": "res", "arch": "test_resnet", "input_size": 32, "weights": "random",
                       "source_top1": 0.5}],
           "datasets": ["digits"],
           "regimes": {"finetune": {"grid": {"lr": lrs, "wd": [0.0]}, "steps": steps, "batch_size": 16,
                                    "checkpoint_every": 5, "log_every": 5}},
           "resources": {"finetune": {"cpu": 1}},
           "final": {"enabled": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_cmd(spec: Path, cluster: Cluster, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xfer.cli", "sweep", str(spec), "--address", cluster.address,
            "--tracking-uri", uri, "--no-final", *extra]


def trial_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "xfer.trial_key" in r.data.tags]


def checkpointed(store: Path, exclude: set[str] = frozenset()) -> str | None:
    """The key of a trial with a periodic checkpoint in its work dir (``<storage>/trials/<key>/``)."""
    for p in sorted((store / "trials").glob("*/train_state.pt")):
        if p.parent.name not in exclude:
            return p.parent.name
    return None


def check_one_finished_run_per_key(uri: str, n: int) -> dict:
    from xfer.tracking import load_runs

    runs = load_runs(uri, NAME)
    assert len(runs) == runs["trial_key"].nunique() == n, runs[["trial_key", "status", "run_id"]]
    assert (runs["status"] == "finished").all(), runs[["trial_key", "status", "run_id"]]
    assert runs["val"].notna().all(), runs[["trial_key", "val"]]
    by_key = {r.data.tags["xfer.trial_key"]: r for r in trial_runs(uri)}
    assert len(by_key) == n
    for r in by_key.values():
        assert "val_top1" in r.data.metrics, r.data.metrics
    return by_key


def test_worker_node_lost_mid_trial_is_retried_from_its_checkpoint(tmp_path, cluster):
    spec = write_spec(tmp_path, [0.01, 0.02], steps=300)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "sweep.log"
    t0 = time.monotonic()
    driver = subprocess.Popen(sweep_cmd(spec, cluster, uri), env=cluster.env, cwd=tmp_path, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        key = wait_for("a trial's first checkpoint", lambda: checkpointed(tmp_path / "store"), 240, proc=driver,
                       log=log)
        t_kill = time.monotonic()
        cluster.kill(cluster.nodes[1])  # the worker node running it: raylet, agents, the trial's worker
        print(f"[timing] first checkpoint of {key} after {t_kill - t0:.1f}s; worker node killed")
        cluster.add_worker("worker2")  # node replacement
        print(f"[timing] replacement node up {time.monotonic() - t_kill:.1f}s after the kill")
        rc = driver.wait(480)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    print(f"[timing] sweep done in {time.monotonic() - t0:.1f}s (rc {rc})\n--- sweep output (tail) ---\n"
          + out[-3000:])
    assert rc == 0, out[-6000:]
    by_key = check_one_finished_run_per_key(uri, 2)
    killed = by_key[key]
    assert killed.data.metrics.get("resumed_from_step", 0) > 0, (killed.data.metrics, out[-4000:])
    assert killed.data.tags["xfer.attempt"] == "2", killed.data.tags
    (other,) = [r for k, r in by_key.items() if k != key]
    assert "resumed_from_step" not in other.data.metrics and other.data.tags["xfer.attempt"] == "1"
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "train_loss")]
    assert max(steps) == 300, steps  # trained to the end


def history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


@pytest.mark.parametrize("again", ["rerun", "resume"])
def test_driver_killed_mid_sweep_then_the_same_command_finishes_the_rest(tmp_path, cluster, again):
    spec = write_spec(tmp_path, [0.01, 0.02, 0.03], steps=150)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = sweep_cmd(spec, cluster, uri)
    log = tmp_path / "sweep.log"
    # Tune snapshots its experiment state every ~10 s: whether the snapshot a killed driver leaves behind
    # already shows the first trial finished is a matter of timing. Here it never does (one snapshot, at the
    # start), so `--resume` always meets the stale snapshot that a real kill leaves now and then.
    env = {**cluster.env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"} if again == "resume" else cluster.env
    t0 = time.monotonic()
    driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        first = wait_for("a finished trial in MLflow", lambda: [r for r in trial_runs(uri)
                                                                if r.data.tags.get("xfer.status") == "finished"],
                         300, every=0.5, proc=driver, log=log)[0]
        done_key = first.data.tags["xfer.trial_key"]
        key = wait_for("a second trial's checkpoint", lambda: checkpointed(tmp_path / "store", {done_key}), 120,
                       proc=driver, log=log)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its session, at once
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    print(f"\n[timing] driver killed {time.monotonic() - t0:.1f}s after start ({done_key} finished, {key} "
          f"checkpointed)")
    before = {r.data.tags["xfer.trial_key"]: r for r in trial_runs(uri)}
    assert before[done_key].data.tags["xfer.attempt"] == "1"
    done_history = history(uri, first.info.run_id)

    t1 = time.monotonic()
    extra = ["--resume"] if again == "resume" else []
    r = subprocess.run(cmd + extra, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    out = r.stdout + r.stderr
    print(f"[timing] `xfer sweep{' --resume' if extra else ''}` after the kill: {time.monotonic() - t1:.1f}s "
          f"(rc {r.returncode})\n--- output (tail) ---\n{out[-3000:]}")
    assert r.returncode == 0, out[-6000:]
    assert "grid: 3 trials — 1 done, 2 to run" in out, out[-4000:]
    if again == "resume":
        assert "grid: not restoring the Tune experiment" in out, out[-4000:]
    by_key = check_one_finished_run_per_key(uri, 3)
    # the finished trial was not run again: same run, first attempt, metric history untouched
    assert by_key[done_key].info.run_id == first.info.run_id
    assert by_key[done_key].data.tags["xfer.attempt"] == "1", by_key[done_key].data.tags
    assert history(uri, first.info.run_id) == done_history
    # the killed trial went on from its checkpoint, in its existing run
    killed = by_key[key]
    assert killed.info.run_id == before[key].info.run_id
    assert killed.data.metrics.get("resumed_from_step", 0) > 0, (killed.data.metrics, out[-4000:])
