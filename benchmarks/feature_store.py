"""What the feature store buys the logistic-regression grid: a λ trial that finds its frozen features
cached vs one that must run the backbone over the data first, in the same process.

The paper's grid fits 45 penalties per (model, dataset); without the store each would repeat the
forward pass. Baseline and cached runs use the same model, data and λ.

    python benchmarks/feature_store.py [--arch test_resnet] [--dataset synthetic_near] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from xfer import features
from xfer.contract import RunContext
from xfer.regimes import REGIMES, run_trial
from xfer.trial import DatasetRef, ModelSpec, TrialSpec


def trial(arch: str, dataset: str, l2: float) -> TrialSpec:
    return TrialSpec(model=ModelSpec(name=arch, arch=arch, weights="random", input_size=32),
                     dataset=DatasetRef(dataset), regime="linear_probe", hparams={"l2": l2},
                     options=REGIMES.get("linear_probe").defaults)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="test_resnet")
    ap.add_argument("--dataset", default="synthetic_near")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cold, warm = [], []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as store:
            ctx = RunContext.local(Path(store), Path(store) / "data")
            features.clear_identity_cache()
            t0 = time.perf_counter()
            r = run_trial(trial(args.arch, args.dataset, 1e-3), ctx)  # computes and stores the features
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r2 = run_trial(trial(args.arch, args.dataset, 1e-2), ctx)  # another λ: reads them back
            warm.append(time.perf_counter() - t0)
            assert r.status == r2.status == "finished", (r.message, r2.message)
    c, w = min(cold), min(warm)
    print(f"linear-probe trial, {args.arch} on {args.dataset}, {args.threads} thread(s), best of {args.repeats}")
    print(f"  features computed (baseline) : {c:6.2f} s")
    print(f"  features from the store      : {w:6.2f} s")
    print(f"  speed-up per λ trial         : {c / w:.1f}x")


if __name__ == "__main__":
    main()
