"""Is source training reproducible? Runs the pretrain trial of one quickstart model repeatedly and
prints its metrics and the sha256 of the checkpoint bytes, so runs can be compared exactly.

Why: two quickstart runs reported different source top-1 for the same model; this separates
"the code is nondeterministic" (repeats at one thread count differ) from "the environment differed"
(only runs at different thread counts differ).

    PYTHONPATH=. python benchmarks/reproducibility.py [--model resnet-long] [--threads 1 2] [--repeats 2] [--pin 1]

``--threads`` sets the process's torch thread count (what OMP_NUM_THREADS or Ray would); the trial
runs unpinned (``RunContext.threads=None``, as before trials pinned it) unless ``--pin N``. Each
(threads, repeat) run uses a fresh storage folder, in this process; run the script twice to compare
across processes. Results are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from xfer.contract import RunContext
from xfer.regimes import run_trial
from xfer.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def run_once(model_name: str, threads: int, steps: int | None, pin: int | None) -> dict[str, object]:
    """One pretrain trial with the process at ``threads`` torch threads, in a fresh storage folder."""
    spec = load_spec(ROOT / "sweeps" / "quickstart.yaml")
    trial = next(t for t in spec.pretrain_trials() if t.model.name == model_name)
    if steps is not None:
        from dataclasses import replace

        trial = replace(trial, options={**trial.options, "steps": steps})
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext.local(storage=Path(tmp) / "s", data_root=Path(tmp) / "d", device="cpu", threads=pin)
        t0 = time.perf_counter()
        r = run_trial(trial, ctx)
        wall = time.perf_counter() - t0
        pth = Path(r.artifacts["checkpoint"])
        digest = hashlib.sha256(pth.read_bytes()).hexdigest()[:16]
        state = torch.load(pth)
        tensors = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))).hexdigest()[:16]
    return {"threads": threads, "pin": pin, "status": r.status,
            "source_top1": r.metrics.get("source_top1"), "train_loss": r.metrics.get("train_loss"),
            "pth_sha256": digest, "tensors_sha256": tensors, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet-long")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override the model's pretrain steps")
    ap.add_argument("--pin", type=int, default=None, help="RunContext.threads (default: unpinned)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    for threads in args.threads:
        for _ in range(args.repeats):
            print(json.dumps(run_once(args.model, threads, args.steps, args.pin)), flush=True)


if __name__ == "__main__":
    main()
