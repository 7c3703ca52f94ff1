"""`xfer` as a user runs it: separate processes running `python -m xfer.cli ...` in a temp directory, offline.

Every cold start pays the torch/timm/torchvision import (3-6 s on a busy 2-core machine), and this
module makes about twenty calls. So:

- a few calls are genuinely cold, ``[sys.executable, "-m", "xfer.cli", ...]`` (one trial, one usage
  error, the unreachable-tracking sweep whose "fails fast" includes start-up);
- the rest run in processes *forked* from a server that has imported torch, timm and the xfer library
  (not ``xfer.cli``) and nothing else: each child chdirs to the temp dir, points fds 0/1/2 at
  /dev/null and files, and runs ``xfer.cli`` as ``__main__`` exactly as ``python -m`` does. Exit codes,
  stderr and uncaught tracebacks are the child's own.

The two lanes run side by side. Trials are tiny (tiny timm models at 32 px, ~10 steps); their wall time
and the trial's own ``seconds`` are printed (``pytest -s``), not asserted — speed targets live in
benchmarks/.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
CALL_TIMEOUT_S = 300
COLD = {"linear_probe", "bad_regime", "sweep_unreachable"}  # the calls that start a fresh interpreter

TINY = ["--model", "test_resnet", "--weights", "random", "--input-size", "32"]
FINETUNE = ["--steps", "10", "--batch-size", "16", "--lr", "0.05", "--wd", "1e-4"]

# The fork server: reads one JSON request per line, forks `python -m xfer.cli` semantics, answers the exit code.
_SERVER = r"""
import json, os, runpy, signal, sys, traceback
import torch, timm, torchvision  # noqa: F401  the slow imports, paid once
import xfer.data, xfer.models, xfer.regimes, xfer.spec  # noqa: F401  (not xfer.cli: it runs fresh as __main__)

def child(req):
    signal.alarm(req["timeout"])  # a hung call dies instead of hanging the test run
    os.chdir(req["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["-m", *req["argv"]]
    code = 0
    try:
        runpy.run_module("xfer.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

# fork is only safe in a single-threaded process (importing these starts no threads; check it stays so)
threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
print("ready" if threads == 1 and hasattr(os, "fork") else f"cannot fork safely ({threads} threads)", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass
class Call:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cold: bool  # a fresh interpreter (wall time includes the imports) or a fork of a pre-imported one

    def __str__(self) -> str:  # shown by failing asserts
        return (f"xfer {' '.join(self.argv)} -> rc {self.returncode} in {self.wall_s:.1f}s "
                f"({'cold' if self.cold else 'forked'})\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")

    def last_json(self) -> dict:
        lines = self.stdout.strip().splitlines()
        assert lines, f"no stdout\n{self}"
        try:
            obj = json.loads(lines[-1])
        except json.JSONDecodeError:
            pytest.fail(f"last stdout line is not JSON\n{self}")
        assert isinstance(obj, dict), f"last line is not a JSON object\n{self}"
        return obj


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "XFER_STORAGE"):  # nothing from the developer's shell
        env.pop(var, None)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])))
    return env


def _run(argv: list[str], cwd: Path) -> Call:
    """A cold `python -m xfer.cli ARGV`."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "xfer.cli", *argv], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=CALL_TIMEOUT_S)
    return Call(argv, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, cold=True)


class ForkServer:
    """Runs calls one at a time in children forked from a pre-imported interpreter (module docstring)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=scratch, env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()
        self.n = 0
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            self.close()
            raise RuntimeError(f"the fork server did not start (said {first!r}, rc {self.proc.poll()})")

    def run(self, argv: list[str], cwd: Path) -> Call:
        with self.lock:
            self.n += 1
            out, err = self.scratch / f"{self.n}.out", self.scratch / f"{self.n}.err"
            t0 = time.perf_counter()
            self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err),
                                              "timeout": CALL_TIMEOUT_S}) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline().strip()
            wall = time.perf_counter() - t0
        if not answer:
            raise RuntimeError(f"the fork server died (rc {self.proc.poll()}) running xfer {' '.join(argv)}")
        return Call(argv, int(answer), out.read_text(), err.read_text(), wall, cold=False)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _trial(work: Path, name: str, *flags: str) -> list[str]:
    return ["trial", *flags, "--storage", str(work / name / "storage"), "--data-root", str(work / "data"), "--json"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return port


def _cases(work: Path) -> dict[str, list[str]]:
    bad_csv = work / "no_source.csv"
    bad_csv.write_text("model,dataset,regime,metric,value\nresnet50,cifar10,finetune,top1,0.9\n")
    ok_digits = ["--dataset", "digits", "--regime", "finetune", *FINETUNE]
    return {
        # --- one trial per regime (grid stage), plus a final-stage and a diverging one
        "linear_probe": _trial(work, "lp", *TINY, "--dataset", "synthetic_near", "--regime", "linear_probe",
                               "--l2", "1e-3"),
        "finetune": _trial(work, "ft", *TINY, *ok_digits),
        "scratch": _trial(work, "sc", *TINY, "--dataset", "digits", "--regime", "scratch", *FINETUNE),
        "pretrain": _trial(work, "pt", *TINY, "--dataset", "synthetic_source", "--regime", "pretrain",
                           "--steps", "10", "--batch-size", "32", "--lr", "0.1",
                           "--dataset-option", "train_per_class=20", "--dataset-option", "test_per_class=10"),
        "final": _trial(work, "final", *TINY, "--dataset", "synthetic_near", "--regime", "linear_probe",
                        "--l2", "1e-3", "--stage", "final"),
        "diverged": _trial(work, "div", *TINY, "--dataset", "digits", "--regime", "finetune", "--steps", "10",
                           "--batch-size", "16", "--lr", "1e6", "--wd", "1e-4"),
        # --- user mistakes: exit 2, one "error: ..." line, no traceback
        "bad_regime": _trial(work, "e1", *TINY, "--dataset", "digits", "--regime", "finetun", *FINETUNE),
        "bad_dataset": _trial(work, "e2", *TINY, "--dataset", "digitz", "--regime", "finetune", *FINETUNE),
        "bad_model": _trial(work, "e3", "--model", "test_resnett", "--weights", "random", *ok_digits),
        "missing_l2": _trial(work, "e4", *TINY, "--dataset", "digits", "--regime", "linear_probe"),
        "l2_for_finetune": _trial(work, "e5", *TINY, *ok_digits, "--l2", "1e-3"),
        "missing_weights_file": _trial(work, "e6", "--model", "test_resnet", "--weights",
                                       str(work / "nowhere" / "weights.pth"), "--input-size", "32",
                                       "--dataset", "digits", "--regime", "linear_probe", "--l2", "1e-3"),
        "bad_option": _trial(work, "e7", *TINY, *ok_digits, "--option", "nonsense=1"),
        # --- the other sub-commands
        "datasets": ["datasets"],
        "models": ["models"],
        "plan": ["plan", "sweeps/quickstart.yaml", "--json"],
        "submit": ["submit", "sweeps/quickstart.yaml", "--dry-run"],
        "report_missing_column": ["report", "--from-csv", str(bad_csv), "--out", str(work / "report")],
        "sweep_unreachable": ["sweep", "sweeps/quickstart.yaml", "--tracking-uri",
                              f"http://127.0.0.1:{_closed_port()}", "--storage", str(work / "sweep-storage"),
                              "--data-root", str(work / "data")],
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "sweeps").mkdir()
    shutil.copy(QUICKSTART, d / "sweeps" / "quickstart.yaml")  # submit wants a path relative to cwd
    return d


@pytest.fixture(scope="module")
def calls(work):
    """Start every call now (they are independent) in two lanes, cold and forked; tests wait for theirs."""
    cases = _cases(work)
    cold, forked = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    futures: dict[str, Future] = {name: cold.submit(_run, argv, work) for name, argv in cases.items() if name in COLD}
    (work / "forked").mkdir()
    try:
        server: ForkServer | None = ForkServer(work / "forked")  # imports while the cold lane runs
        run = server.run
    except RuntimeError as e:  # then every call is cold: slower, same checks
        print(f"\n{e}; running every call in a fresh interpreter")
        server, run = None, _run
    futures.update({name: forked.submit(run, argv, work) for name, argv in cases.items() if name not in COLD})
    yield futures
    for pool in (cold, forked):
        pool.shutdown(wait=True, cancel_futures=True)
    if server is not None:
        server.close()


def _get(calls, name: str) -> Call:
    return calls[name].result(timeout=CALL_TIMEOUT_S * 2)


# ------------------------------------------------------------------ trials, one per regime
def _storage(call: Call) -> Path:
    return Path(call.argv[call.argv.index("--storage") + 1])


def _check_trial_ok(call: Call) -> dict:
    assert call.returncode == 0, str(call)
    assert "Traceback" not in call.stderr, str(call)
    result = call.last_json()
    assert result["status"] == "finished", str(call)
    assert result["trial_key"] and isinstance(result["seconds"], (int, float)) and result["seconds"] >= 0
    return result


def _report_timing(name: str, call: Call, result: dict) -> None:
    how = "cold process, incl. imports" if call.cold else "forked, imports excluded"
    print(f"\n[timing] xfer trial {name}: wall {call.wall_s:.1f}s ({how}), trial 'seconds' {result['seconds']:.2f}s")


@pytest.mark.parametrize("regime", ["linear_probe", "finetune", "scratch"])
def test_trial_each_transfer_regime_reports_validation_only(calls, regime):
    call = _get(calls, regime)
    result = _check_trial_ok(call)
    _report_timing(regime, call, result)
    val = {k: v for k, v in result.items() if k.startswith("val_")}
    assert list(val) == ["val_top1"], f"expected exactly the dataset's validation metric\n{call}"
    assert 0.0 <= val["val_top1"] <= 1.0
    assert not [k for k in result if k.startswith("test_")], f"a grid trial must not report test metrics\n{call}"
    assert result["metric"] == "top1"
    assert math.isfinite(result["train_loss"])
    if regime != "linear_probe":
        assert result["steps_done"] == 10
    assert f"val_top1: {val['val_top1']:.4f}" in call.stdout  # the human-readable lines agree with the JSON


def test_trial_pretrain_reports_source_accuracy(calls):
    call = _get(calls, "pretrain")
    result = _check_trial_ok(call)
    _report_timing("pretrain", call, result)
    assert 0.0 <= result["source_top1"] <= 1.0
    assert result["test_top1"] == result["source_top1"]
    assert not [k for k in result if k.startswith("val_")]
    assert result["steps_done"] == 10
    # the checkpoint the other regimes transfer from is where the context says
    ckpt = _storage(call) / "checkpoints" / result["trial_key"]
    assert (ckpt / "model.pth").is_file() and json.loads((ckpt / "meta.json").read_text())["complete"] is True


def test_trial_final_stage_reports_test_and_no_validation(calls):
    call = _get(calls, "final")
    result = _check_trial_ok(call)
    _report_timing("linear_probe --stage final", call, result)
    assert 0.0 <= result["test_top1"] <= 1.0
    assert not [k for k in result if k.startswith("val_")], str(call)
    grid = _check_trial_ok(_get(calls, "linear_probe"))
    assert grid["trial_key"] != result["trial_key"]  # the stage is part of the trial's identity


def test_trial_divergence_is_a_status_not_a_crash(calls):
    call = _get(calls, "diverged")
    assert call.returncode == 0, str(call)
    assert "Traceback" not in call.stderr, str(call)
    result = call.last_json()
    assert result["status"] == "diverged", str(call)
    assert "nan" in result["message"] or "inf" in result["message"], str(call)
    assert not [k for k in result if k.startswith(("val_", "test_"))]
    _report_timing("finetune --lr 1e6 (diverged)", call, result)


# ------------------------------------------------------------------ user mistakes
def _check_usage_error(call: Call) -> str:
    assert call.returncode == 2, str(call)
    assert call.stderr.startswith("error: "), str(call)
    assert "Traceback" not in call.stderr and "Traceback" not in call.stdout, str(call)
    assert not call.stdout.strip().startswith("trial "), f"nothing may start for a bad command line\n{call}"
    return call.stderr


@pytest.mark.parametrize("case, expected", [
    ("bad_regime", ["'finetun'", "Did you mean 'finetune'", "linear_probe", "pretrain", "scratch"]),
    ("bad_dataset", ["'digitz'", "Did you mean 'digits'", "synthetic_near"]),
    ("bad_model", ["'test_resnett'", "test_resnet", "xfer models --all"]),
    ("missing_l2", ["--l2", "linear_probe"]),
    ("l2_for_finetune", ["l2", "finetune"]),
    ("bad_option", ["nonsense", "steps", "batch_size"]),
])
def test_bad_input_is_exit_2_with_one_error_line(calls, case, expected):
    err = _check_usage_error(_get(calls, case))
    for text in expected:
        assert text in err, f"{text!r} missing from: {err}"
    # the storage folder of a refused trial is never made
    assert not _storage(_get(calls, case)).exists()


def test_hparam_of_another_regime_names_this_regimes_hparams(calls):
    err = _check_usage_error(_get(calls, "l2_for_finetune"))
    assert re.search(r"\blr\b", err) and re.search(r"\bwd\b", err), err


def test_missing_weights_file_is_a_usage_error(calls):
    call = _get(calls, "missing_weights_file")
    err = _check_usage_error(call)
    assert "weights.pth" in err and ("does not exist" in err or "no such" in err.lower()), err


# ------------------------------------------------------------------ other sub-commands
def test_datasets_lists_every_registered_dataset(calls):
    from xfer.data import DATASETS

    call = _get(calls, "datasets")
    assert call.returncode == 0, str(call)
    rows = {line.split()[0]: line.split() for line in call.stdout.splitlines()[1:-1] if line.strip()}  # -1: note
    assert set(rows) == set(DATASETS.names()), str(call)
    for name in DATASETS.names():
        info = DATASETS.get(name).info
        assert rows[name][1:3] == [str(info.num_classes), info.metric], rows[name]
    assert rows["digits"][4] == "yes" and rows["cifar10"][4] == "no"  # the offline column


def test_models_prints_the_shipped_table(calls):
    call = _get(calls, "models")
    assert call.returncode == 0, str(call)
    table = (REPO / "xfer" / "source_top1.csv").read_text().splitlines()
    rows = list(csv.DictReader(line for line in table if line.strip() and not line.startswith("#")))
    assert rows
    out = {line.split()[0]: line for line in call.stdout.splitlines() if line.strip()}
    for row in rows:
        assert row["arch"] in out, f"{row['arch']} missing\n{call}"
        if row["top1"].strip():
            assert f"{100 * float(row['top1']):.2f}" in out[row["arch"]], out[row["arch"]]


def _grid_size(axis) -> int:
    items = axis if isinstance(axis, list) else [axis]
    return sum(int(float(i["logspace"][2])) if isinstance(i, dict) else 1 for i in items)


def test_plan_counts_the_grid_trials(calls):
    call = _get(calls, "plan")
    assert call.returncode == 0, str(call)
    p = json.loads(call.stdout)
    raw = yaml.safe_load(QUICKSTART.read_text())
    cells = len(raw["models"]) * len(raw["datasets"]) * len(raw.get("seeds", [0]))
    per_regime = {r: math.prod(_grid_size(v) for v in cfg["grid"].values()) for r, cfg in raw["regimes"].items()}
    assert p["total"] == cells * sum(per_regime.values()), p
    assert p["by_regime"] == {r: cells * n for r, n in per_regime.items()}
    assert p["pretrain"] == sum(m.get("weights") == "pretrain" for m in raw["models"])  # all distinct here


def test_submit_dry_run_prints_a_rayjob(calls):
    call = _get(calls, "submit")
    assert call.returncode == 0, str(call)
    doc = yaml.safe_load(call.stdout)
    assert doc["kind"] == "RayJob" and doc["apiVersion"].startswith("ray.io/"), doc
    assert "sweeps/quickstart.yaml" in doc["spec"]["entrypoint"]


def test_report_from_csv_missing_column_lists_required(calls):
    call = _get(calls, "report_missing_column")
    err = _check_usage_error(call)
    assert "source_top1" in err
    required = err[err.index("Required"):] if "Required" in err else err
    for col in ("model", "dataset", "regime", "source_top1", "metric", "value"):
        assert col in required, err
    assert not (Path(call.argv[call.argv.index("--out") + 1])).exists()


def test_sweep_with_unreachable_tracking_server_starts_nothing(calls, work):
    call = _get(calls, "sweep_unreachable")
    err = _check_usage_error(call)
    assert "cannot reach" in err and "127.0.0.1" in err, err
    assert call.wall_s < 30, str(call)
    assert not (work / "sweep-storage").exists()  # no storage, no Ray, no parent run
    assert not (work / "mlflow.db").exists()
    assert "parent run" not in call.stdout, str(call)
