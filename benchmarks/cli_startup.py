"""Cold start of the `xfer` command: this checkout against a baseline revision, side by side.

Each command runs in a fresh interpreter (what a user waits for), alternating baseline and current so
both see the same machine load; the median of ``--repeats`` runs is printed with the ratio.

    python benchmarks/cli_startup.py --baseline 03d150b [--repeats 5]

The baseline is checked out into a temporary git worktree and run with the same Python (the project's
venv), with that worktree first on ``sys.path``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "xfer --help": ["--help"],
    "spec error (unknown key)": ["plan", "{tmp}/bad.yaml"],
    "xfer plan kornblith2019": ["plan", "{repo}/sweeps/kornblith2019-public.yaml"],
}


def run(tree: Path, argv: list[str], tmp: Path) -> float:
    args = [a.format(tmp=tmp, repo=tree) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xfer.cli", *args], cwd=tmp, env=env, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "bad.yaml").write_text("name: x\nnme: y\n")
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), a.baseline], check=True)
        try:
            for tree in (base, REPO):  # warm the page cache and the timm name index once
                for argv in COMMANDS.values():
                    run(tree, argv, tmp)
            print(f"{'command':<28} {'baseline':>10} {'current':>10} {'ratio':>7}   (median of {a.repeats}, seconds)")
            for name, argv in COMMANDS.items():
                b, c = [], []
                for _ in range(a.repeats):
                    b.append(run(base, argv, tmp))
                    c.append(run(REPO, argv, tmp))
                mb, mc = statistics.median(b), statistics.median(c)
                print(f"{name:<28} {mb:>10.2f} {mc:>10.2f} {mb / mc:>6.1f}x")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
