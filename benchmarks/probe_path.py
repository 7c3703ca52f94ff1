"""The linear probe's 45-value λ grid: the path solver (``xfer.lambda_path``) vs scikit-learn's lbfgs once
per C, and optionally vs independent cold ``fit_logistic`` calls, all in the same process.

The features are synthetic but shaped like pooled CNN features: class-structured Gaussian clusters whose
covariance has a power-law spectrum (eigenvalue k ∝ 1/k, random rotation), z-scored with the training
split's statistics as the regime does. Every method solves the same objective, mean CE + (λ/2)‖W‖²
(sklearn with C = 1/(λ n), tol on max |gradient| in both), on 45 λ log-spaced in [1e-6, 1e5]; the
selected λ is the one with the best validation accuracy.

    python benchmarks/probe_path.py --n 10000 --d 2048 --classes 100 --threads 1 [--skip-cold]
    python benchmarks/probe_path.py --small            # a quick run (n 2000, d 256, 20 classes, cold fits)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfer.lambda_path import fit_logistic_path, path_decision_values  # noqa: E402
from xfer.logistic import Standardizer, fit_logistic, logistic_objective  # noqa: E402


def make_features(n: int, n_val: int, d: int, classes: int, sep: float, seed: int):
    """Train/val features (z-scored with train statistics) and class ids; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mix = q * torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)  # covariance eigenvalues 1/k
    # class means along the same directions with a faster-decaying spectrum (1/k²): the top directions
    # carry the signal, the tail is mostly noise, so a moderate λ wins on validation, as on real features
    means = sep * torch.randn(classes, d, generator=g, dtype=torch.float64) @ (q / torch.arange(1, d + 1)).T
    y = torch.randint(0, classes, (n + n_val,), generator=g)
    x = means[y] + torch.randn(n + n_val, d, generator=g, dtype=torch.float64) @ mix.T
    x = x + 0.5 * torch.randn(d, generator=g, dtype=torch.float64).exp()  # uncentred, unequal scales
    st = Standardizer.fit(x[:n])
    return st(x[:n]), y[:n], st(x[n:]), y[n:]


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="training examples (validation: n/2)")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sep", type=float, default=1.5, help="class-mean scale (larger: easier classes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--num-l2", type=int, default=45)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--skip-cold", action="store_true", help="skip the independent fit_logistic calls (slow)")
    ap.add_argument("--small", action="store_true", help="n 2000, d 256, 20 classes")
    args = ap.parse_args()
    if args.small:
        args.n, args.d, args.classes = 2000, 256, 20
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    lams = np.logspace(-6, 5, args.num_l2).tolist()
    x, y, xv, yv = make_features(args.n, args.n // 2, args.d, args.classes, args.sep, args.seed)
    n = args.n
    print(f"λ grid: {len(lams)} values in [1e-6, 1e5]; train {n} x {args.d}, {args.classes} classes, "
          f"val {len(yv)}; {args.threads} thread(s); tol {args.tol:g}, max_iter {args.max_iter}", flush=True)

    def objective(w: torch.Tensor, b: torch.Tensor, lam: float) -> float:
        return float(logistic_objective(w, b, x, y, lam, multilabel=False))

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    fits = fit_logistic_path(x, y, lams, num_classes=args.classes, tol=args.tol, max_iter=args.max_iter)
    t_path = time.perf_counter() - t0
    results["path"] = dict(wall=t_path, acc=[accuracy(s, yv) for s in path_decision_values(fits, xv)],
                           obj=[f.objective for f in fits], iters=sum(f.n_iter for f in fits),
                           unconverged=sum(not f.converged for f in fits))
    print(f"  path solver           : {t_path:8.1f} s  ({results['path']['iters']} L-BFGS iterations, "
          f"{results['path']['unconverged']} λ not converged)", flush=True)

    if not args.skip_sklearn:
        acc, obj, iters, unconverged = [], [], 0, 0
        t0 = time.perf_counter()
        for lam in lams:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                sk = LogisticRegression(C=1.0 / (lam * n), solver="lbfgs", tol=args.tol,
                                        max_iter=args.max_iter).fit(x.numpy(), y.numpy())
            unconverged += any(issubclass(c.category, ConvergenceWarning) for c in caught)
            iters += int(sk.n_iter_.max())
            w, b = torch.from_numpy(sk.coef_), torch.from_numpy(sk.intercept_)
            acc.append(accuracy(xv @ w.T + b, yv))
            obj.append(objective(w, b, lam))
        t_sk = time.perf_counter() - t0
        results["sklearn"] = dict(wall=t_sk, acc=acc, obj=obj, iters=iters, unconverged=unconverged)
        print(f"  sklearn lbfgs per C   : {t_sk:8.1f} s  ({iters} iterations, {unconverged} λ not converged)",
              flush=True)

    if not args.skip_cold:
        t0 = time.perf_counter()
        cold = [fit_logistic(x, y, lam, num_classes=args.classes, tol=args.tol, max_iter=args.max_iter)
                for lam in lams]
        t_cold = time.perf_counter() - t0
        results["cold"] = dict(wall=t_cold, acc=[accuracy(f.decision_function(xv), yv) for f in cold],
                               obj=[f.objective for f in cold], iters=sum(f.n_iter for f in cold),
                               unconverged=sum(not f.converged for f in cold))
        print(f"  cold fit_logistic x{len(lams)} : {t_cold:8.1f} s  ({results['cold']['iters']} iterations, "
              f"{results['cold']['unconverged']} λ not converged)", flush=True)

    path = results["path"]
    best = int(np.argmax(path["acc"]))
    print(f"path: selected λ = {lams[best]:.3g}, val accuracy {path['acc'][best]:.4f}")
    for name in ("sklearn", "cold"):
        if name not in results:
            continue
        r = results[name]
        diffs = [abs(a - b) for a, b in zip(path["acc"], r["acc"])]
        worst = int(np.argmax(diffs))
        rel = [(a - b) / abs(b) for a, b in zip(path["obj"], r["obj"])]
        sel = int(np.argmax(r["acc"]))
        same = "same λ" if sel == best else (f"λ = {lams[sel]:.3g} ({r['acc'][sel]:.4f}; path at it: "
                                             f"{path['acc'][sel]:.4f})")
        print(f"vs {name:7s}: speed-up {r['wall'] / path['wall']:.1f}x | val accuracy max |Δ| "
              f"{100 * max(diffs):.2f} points (at λ = {lams[worst]:.3g}) | selected: {same} | objective "
              f"(path - {name}) / {name}: max {max(rel):+.1e}, min {min(rel):+.1e}")
        near = [i for i in range(len(lams)) if abs(math.log10(lams[i] / lams[best])) <= 1.0]
        print(f"             val accuracy max |Δ| within a decade of the selected λ: "
              f"{100 * max(diffs[i] for i in near):.2f} points")


if __name__ == "__main__":
    main()
