"""What each command imports, in a fresh interpreter (the point of these calls): `xfer --help` and a
structural spec error need neither torch nor Ray, `xfer plan` no Ray (nor timm with --counts-only), `xfer report --from-csv`
no Ray. Start-up *times* are measured in benchmarks/cli_startup.py, not asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from xfer.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = ("torch", "ray", "timm", "mlflow")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def loaded(argv: list[str], cwd: Path) -> tuple[int, set[str]]:
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    return last["code"], set(last["loaded"])


def test_help_imports_nothing_heavy(tmp_path):
    code, mods = loaded(["--help"], tmp_path)
    assert code == 0 and mods == set()


def test_a_structural_spec_error_imports_nothing_heavy(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nnme: y\n")
    code, mods = loaded(["plan", "bad.yaml"], tmp_path)
    assert code == 2 and mods == set()


def test_plan_counts_need_no_ray_timm_or_mlflow(tmp_path):
    # (the cost estimate counts FLOPs on timm networks; trial counts alone stay cheap)
    code, mods = loaded(["plan", str(REPO / "sweeps" / "kornblith2019-public.yaml"), "--counts-only"], tmp_path)
    assert code == 0 and not mods & {"ray", "timm", "mlflow"}, mods


def test_plan_with_its_cost_needs_no_ray_or_mlflow(tmp_path):
    code, mods = loaded(["plan", str(REPO / "sweeps" / "single-gpu.yaml")], tmp_path)
    assert code == 0 and not mods & {"ray", "mlflow"}, mods


def test_report_from_csv_imports_no_ray(tmp_path):
    rows = ["model,dataset,regime,source_top1,metric,value"]
    rows += [f"m{i},d{j},finetune,{0.5 + 0.1 * i},top1,{0.4 + 0.1 * i + 0.01 * j}" for i in range(3) for j in range(2)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    code, mods = loaded(["report", "--from-csv", "r.csv", "--out", "out"], tmp_path)
    assert code == 0 and (tmp_path / "out" / "report.html").is_file()
    assert "ray" not in mods and "torch" not in mods, mods
