"""Per-trial scheduling overhead of a Tune grid of tiny trials, with and without actor reuse.

xfer's sweeps run thousands of small trials (45 logistic-regression λ values per cell); a fresh actor
per trial re-imports torch and timm each time. `xfer.sweep.run_stage` sets ``reuse_actors=True``;
this script measures what that buys, against the default, in the same process and Ray session.

    python benchmarks/ray_trial_overhead.py [--trials 24] [--cpus 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402


def tiny_trial(config):
    import timm  # noqa: F401  - what a real xfer trial imports
    import torch  # noqa: F401

    tune.report({"xfer_final": True, "status": "finished", "val_top1": 0.5})


def run(n: int, reuse: bool, storage: str) -> float:
    t0 = time.perf_counter()
    tune.Tuner(
        tune.with_resources(tiny_trial, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse),
        run_config=tune.RunConfig(name=f"bench-{reuse}", storage_path=storage, verbose=0),
    ).fit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024**2, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as storage:
        base = run(args.trials, False, storage)
        fast = run(args.trials, True, storage)
    ray.shutdown()
    print(f"{args.trials} trivial trials on {args.cpus} CPUs")
    print(f"  fresh actor per trial : {base:6.1f} s  ({base / args.trials:.2f} s/trial)")
    print(f"  reuse_actors=True     : {fast:6.1f} s  ({fast / args.trials:.2f} s/trial)")
    print(f"  speed-up              : {base / fast:.1f}x")


if __name__ == "__main__":
    main()
