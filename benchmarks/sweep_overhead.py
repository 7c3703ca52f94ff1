"""Bookkeeping per trial in a real `xfer sweep` of logistic-regression trials: one Ray trial (and one
tracking round-trip) per λ, as before, against a cell's λ grid solved as one task (the path solver),
same spec, same process, same machine. Each λ is its own MLflow run in both.

overhead per trial = (stage wall time − the trials' own compute, summed) / trials

Ray gets one CPU (``--cpus 1``), so trials run one at a time and the difference is bookkeeping (with
two CPUs, trials overlap and the sum of their compute exceeds the wall time).

where the trials' own compute is the ``trial_seconds`` each run records (a batch's wall time is shared
among its trials). Frozen features are computed once, before the grid, and are not counted.

    python benchmarks/sweep_overhead.py --models 4 --lambdas 45 --datasets digits synthetic_near synthetic_far
                                                               # 540 probe trials
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


def spec(root: Path, name: str, models: int, lambdas: int, datasets: list[str]) -> Path:
    arches = ["test_resnet", "test_byobnet", "test_efficientnet", "test_convnext"]
    raw = {"name": name, "storage": str(root / "store"), "data_root": str(root / "data"), "final": {"enabled": False},
           "models": [{"name": a, "arch": a, "weights": "random", "input_size": 32} for a in arches[:models]],
           "datasets": datasets,
           "regimes": {"linear_probe": {"grid": {"l2": {"logspace": [1e-4, 1e3, lambdas]}}, "max_iter": 200}},
           "resources": {"linear_probe": {"cpu": 1}}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(root: Path, name: str, args, batch: bool) -> dict[str, float]:
    from xfer import sweep, tracking
    from xfer.spec import load_spec

    real = sweep.trial_configs
    # the baseline: one Ray trial per λ, as the sweep ran before the path solver
    sweep.trial_configs = (lambda trials, batch=True, per_task=None: real(trials, batch=False)) if not batch else real
    try:
        lambdas = args.lambdas if batch else (args.baseline_lambdas or args.lambdas)
        s = load_spec(spec(root, name, args.models, lambdas, args.datasets))
        uri = f"sqlite:///{root}/{name}.db"
        out = io.StringIO()
        result = sweep.run_sweep(s, tracking_uri=uri, stream=out, quiet=True)
    finally:
        sweep.trial_configs = real
    grid = next(st for st in result.stages if st.stage == "grid")
    runs = tracking.load_runs(uri, name)
    runs = runs[runs["stage"] == "grid"]
    compute = float(runs["seconds"].sum())
    return {"trials": len(runs), "wall": grid.seconds, "compute": compute,
            "overhead": (grid.seconds - compute) / max(1, len(runs)), "finished": int((runs["status"] == "finished").sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--lambdas", type=int, default=50)
    ap.add_argument("--datasets", nargs="+", default=["digits"])
    ap.add_argument("--baseline-lambdas", type=int, default=None,
                    help="λ values per cell in the baseline (default: --lambdas; fewer keeps it short, the figure is per trial)")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs Ray may use (1: trials run one at a time)")
    args = ap.parse_args()
    import ray

    from xfer.sweep import connect_ray

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024, _node_ip_address="127.0.0.1")
        connect_ray(None)  # joins the instance above
        try:
            t0 = time.perf_counter()
            # each sweep has its own experiment; they share the feature store, which the first one fills
            # before its grid (feature time is outside the grid stage, so it counts for neither)
            base = run(root, "per-trial", args, batch=False)
            path = run(root, "per-path", args, batch=True)
        finally:
            ray.shutdown()
    print(f"{'mode':<22} {'trials':>6} {'wall s':>8} {'compute s':>10} {'overhead/trial s':>17}")
    for label, r in (("one Ray trial per λ", base), ("λ path per cell", path)):
        print(f"{label:<22} {r['trials']:>6} {r['wall']:>8.1f} {r['compute']:>10.1f} {r['overhead']:>17.3f}")
    print(f"overhead ratio: {base['overhead'] / max(path['overhead'], 1e-9):.1f}x; wall ratio: "
          f"{base['wall'] / path['wall']:.1f}x; total {time.perf_counter() - t0:.0f}s; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
