"""Planned against measured time of a small real sweep: how far `xfer plan`'s figures are from a run.

    python benchmarks/plan_accuracy.py                         # the small offline study below, on this CPU
    python benchmarks/plan_accuracy.py --spec sweeps/quickstart.yaml

1. calibrates every network of the study on this CPU (``xfer plan --calibrate --device cpu``; timed);
2. plans it twice: from that calibration, and from the FLOP model alone (the `cpu` profile);
3. runs it for real (``xfer.sweep.run_sweep``: local Ray on this machine's cores, SQLite MLflow, all under a
   temporary folder) and takes each stage's wall time (the sweep's ``StageOutcome`` seconds; the features
   stage, which has none, timed around ``run_features``);
4. prints planned and measured wall time per stage and their ratio, then the planned trial time against
   the trials' own (each MLflow run's ``seconds``, summed per stage), with the load average.

The report stage (tables and figures) is not planned; it is in the measured total only.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PRETRAIN = {"dataset": "synthetic_source", "steps": 150, "lr": 0.1, "batch_size": 128, "wd": 1.0e-4,
            "label_smoothing": 0.0, "dropout": 0.0, "aux_head": "off"}
SMALL = {  # half the quickstart: two source-trained tiny networks × two targets × the three regimes
    "name": "plan-accuracy",
    "models": [{"name": "resnet", "arch": "test_resnet", "input_size": 32, "weights": "pretrain", "pretrain": PRETRAIN},
               {"name": "efficientnet", "arch": "test_efficientnet", "input_size": 32, "weights": "pretrain",
                "pretrain": PRETRAIN}],
    "datasets": ["synthetic_near", "digits"],
    "regimes": {"linear_probe": {"grid": {"l2": {"logspace": [1.0e-4, 1.0e-1, 3]}}},
                "finetune": {"grid": {"lr": [0.01, 0.05], "wd": [1.0e-5]}, "steps": 60, "batch_size": 64,
                             "trials_per_task": 2},
                "scratch": {"grid": {"lr": [0.05], "wd": [1.0e-5]}, "steps": 60, "batch_size": 64}},
    "resources": {r: {"cpu": 1} for r in ("pretrain", "linear_probe", "finetune", "scratch")},
}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", help="a sweep file to measure instead of the built-in small study")
    ap.add_argument("--keep", help="keep the run's files in this folder (default: a temporary one)")
    args = ap.parse_args()

    from xfer import cost, sweep
    from xfer.layout import StorageLayout
    from xfer.spec import parse_spec

    raw = yaml.safe_load(Path(args.spec).read_text()) if args.spec else dict(SMALL)
    root = Path(args.keep or tempfile.mkdtemp(prefix="xfer-plan-accuracy-")).resolve()
    raw.update(storage=str(root / "store"), data_root=str(root / "data"))
    spec = parse_spec(raw, path=args.spec)
    layout = StorageLayout(Path(spec.storage), Path(spec.data_root))
    cpus = os.cpu_count() or 1
    print(f"load average at start: {loadavg()}; {cpus} CPU cores; files under {root}", flush=True)

    t0 = time.perf_counter()
    cost.calibrate(spec, "cpu", layout=layout, log=lambda m: print(f"  {m}", flush=True))
    print(f"calibration: {time.perf_counter() - t0:.1f} s", flush=True)
    calibrated = cost.plan_cost(spec, layout=layout, cpus=cpus)
    flop_model = cost.plan_cost(spec, layout=layout, cpus=cpus, use_cache=False)

    measured: dict[str, float] = {}
    real_features = sweep.run_features

    def timed_features(*a, **kw):
        t = time.perf_counter()
        try:
            return real_features(*a, **kw)
        finally:
            measured["features"] = time.perf_counter() - t

    sweep.run_features = timed_features  # the features stage reports no seconds of its own
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        result = sweep.run_sweep(spec, tracking_uri=f"sqlite:///{root}/mlflow.db", stream=out, quiet=True)
    finally:
        sweep.run_features = real_features
    total = time.perf_counter() - t0
    measured.update({s.stage: s.seconds for s in result.stages})
    failed = sum(s.statuses.get("failed", 0) for s in result.stages)

    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("plan")), None)
    if start is not None:  # what `xfer sweep` printed before it started (from the cache, never calibrating)
        end = next(i for i in range(start, len(lines)) if lines[i].startswith(("  throughput", "plan: no")))
        print("\n".join(["", "xfer sweep printed:", *lines[start:end + 1]]))
    print(f"\n{'stage':<9} {'planned (calibrated)':>21} {'planned (FLOP model)':>21} {'measured':>9} "
          f"{'measured / calibrated':>22} {'measured / FLOP':>16}")
    for stage in cost.STAGES:
        if stage not in calibrated.wall_s:
            continue
        p, f, m = calibrated.wall_s[stage], flop_model.wall_s[stage], measured.get(stage, float("nan"))
        print(f"{stage:<9} {p:>20.1f}s {f:>20.1f}s {m:>8.1f}s {m / p:>22.2f} {m / f:>16.2f}")
    p, f = sum(calibrated.wall_s.values()), sum(flop_model.wall_s.values())
    print(f"{'sweep':<9} {p:>20.1f}s {f:>20.1f}s {total:>8.1f}s {total / p:>22.2f} {total / f:>16.2f}"
          "   (measured: the whole run_sweep, with Ray start-up and the report)")
    # the trials' own time (each MLflow run's seconds: the trial process, without Ray's and MLflow's share)
    from xfer import tracking

    runs = tracking.load_runs(result.tracking_uri, spec.name)
    print(f"\n{'stage':<9} {'planned trial-seconds':>22} {'measured (MLflow)':>18} {'ratio':>6}   (summed over trials)")
    for stage in ("pretrain", "grid", "final"):
        planned = sum(r.seconds for r in calibrated.rows if r.work.stage == stage)
        mine = runs[runs["stage"] == stage].drop_duplicates("trial_key")  # a shared trial: one row per model
        got = float(mine["seconds"].sum()) if len(mine) else float("nan")
        if planned:
            print(f"{stage:<9} {planned:>21.1f}s {got:>17.1f}s {got / planned:>6.2f}")
    hours = calibrated.totals()
    print(f"planned device-hours (calibrated): " + ", ".join(f"{h:.4f} {u}" for u, h in hours.items()))
    print(f"trials failed: {failed}; load average at end: {loadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
