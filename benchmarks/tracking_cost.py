"""What logging a finished trial costs the driver, and whether it grows with the experiment.

The sweep's Tune callback logs the results of a finished batch (e.g. one cell's λ path: 45 runs). This
script feeds it the same kind of results — real ``TrialSpec``s and ``TrialRecord``s of linear-probe
trials — into a real MLflow store, in two ways, in the same process:

* **per run** (the baseline, how every result was logged before): ``_write_entry`` for each result —
  create the run, tags, params, metrics, final tags, terminate (about six round trips);
* **batched** (what ``xfer sweep`` does now): ``_write_entries`` for the whole batch — new runs in one
  transaction on a SQL store (``xfer.tracking.bulk``).

Each is timed while the experiment holds ``--sizes`` runs already (filled in bulk first), to show the
cost per run stays flat as an experiment grows; the two modes alternate batch by batch and each figure is
the median over batches (one slow disk flush does not move it).

    python benchmarks/tracking_cost.py [--sizes 200 10000] [--batch 45] [--batches 20]
    python benchmarks/tracking_cost.py --random-ids         # bulk runs with random (uuid4) ids, for contrast
    python benchmarks/tracking_cost.py --uri postgresql://...   # any SQL store or http(s):// server
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfer.contract import TrialRecord  # noqa: E402
from xfer.trial import DatasetRef, ModelSpec, TrialSpec  # noqa: E402


def entries(start: int, count: int) -> list[dict]:
    """``count`` finished linear-probe results, as the callback receives them from a batch."""
    out = []
    for i in range(start, start + count):
        spec = TrialSpec(model=ModelSpec(name=f"m{i // 45}", arch="test_resnet", weights="random", input_size=32),
                         dataset=DatasetRef("digits"), regime="linear_probe", hparams={"l2": 10.0 ** (-6 + (i % 45) / 4)},
                         options={"max_iter": 1000, "tol": 1e-6, "standardize": True, "batch_size": 256})
        record = TrialRecord(status="finished", metric="top1", metrics={"val_top1": 0.9, "train_loss": 0.1},
                             steps_done=42, fingerprints={"data": "d" * 16, "weights": "w" * 16}, seconds=0.05)
        out.append({"key": spec.key, "trial": spec.to_dict(), "record": json.dumps(record.to_json()), "models": None,
                    "step": 42, "ray_trial_id": f"t{i}", "unsent": [], "run_id": None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 10_000], help="runs already in the experiment")
    ap.add_argument("--batch", type=int, default=45, help="results per finished batch (a λ path: 45)")
    ap.add_argument("--batches", type=int, default=20, help="batches timed per mode and size")
    ap.add_argument("--random-ids", action="store_true",
                    help="bulk runs with uuid4 ids instead of time-ordered ones (the earlier behaviour, for contrast)")
    ap.add_argument("--uri", default=None, help="tracking URI (default: a fresh SQLite file)")
    args = ap.parse_args()
    from xfer.tracking import bulk
    from xfer.tracking.writer import SweepTracker

    if args.random_ids:
        import uuid

        bulk.ordered_run_id = lambda: uuid.uuid4().hex

    tmp = tempfile.mkdtemp(prefix="xfer-tracking-cost-")
    uri = args.uri or f"sqlite:///{tmp}/mlflow.db"
    tracker = SweepTracker(uri, f"tracking-cost-{int(time.time())}")
    tracker.start_parent({"benchmark": "tracking_cost"})
    cb = tracker.callback()
    filler = cb._new_run  # complete runs, as the sweep writes them
    n = 0
    rows = []
    print(f"store {uri}; {args.batches} batches of {args.batch} results per mode and size", flush=True)
    for size in sorted(args.sizes):
        t = time.perf_counter()
        while n < size:  # fill the experiment up to `size` (in bulk: fast)
            todo = entries(n, min(1000, size - n))
            bulk.create_runs(tracker.client, tracker.experiment_id, [filler(e) for e in todo])
            n += len(todo)
        tracker.existing(None)  # the sweep reads the experiment once per invocation, not per run
        print(f"  experiment filled to {n} runs in {time.perf_counter() - t:.1f} s", flush=True)
        times: dict[str, list[float]] = {"per run": [], "batched": []}
        for _ in range(args.batches):  # the modes alternate batch by batch: both see the same machine
            for mode in times:
                batch = entries(n, args.batch)
                t = time.perf_counter()
                if mode == "per run":
                    for e in batch:
                        cb._write_entry(e)
                else:
                    cb._write_entries(batch)
                times[mode].append((time.perf_counter() - t) / len(batch))
                n += len(batch)
        per = {mode: statistics.median(ts) for mode, ts in times.items()}  # robust to a slow fsync or two
        rows.append((size, per))
        print(f"  at {size:>6} runs: per run {per['per run'] * 1e3:7.1f} ms, batched {per['batched'] * 1e3:6.2f} ms "
              f"({per['per run'] / per['batched']:.1f}x; medians over {args.batches} batches, mean batched "
              f"{statistics.mean(times['batched']) * 1e3:.2f} ms)", flush=True)
    tracker.end_parent()
    if len(rows) > 1:
        (s0, a), (s1, b) = rows[0], rows[-1]
        print(f"growth {s0} -> {s1} runs: per run {b['per run'] / a['per run']:.2f}x, "
              f"batched {b['batched'] / a['batched']:.2f}x")


if __name__ == "__main__":
    main()
