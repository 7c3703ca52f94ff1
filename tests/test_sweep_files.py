"""The offline study files under sweeps/ run end to end and their report has the section they exist for.

Each file is run as written — its models, datasets, grids, cell axes and options — with only its lengths
shortened (source training, trial steps, evaluation cadence) and, where the file names more settings than
one section needs, fewer models or seeds, so the whole module runs in a few minutes on two CPU cores.
Real Ray on 127.0.0.1, real MLflow (SQLite), real timm models and torch training.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from xfer.spec import load_spec

pytestmark = pytest.mark.integration

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def shorten(raw: dict[str, Any], *, pretrain_steps: int = 20, steps: int = 10, eval_every: int = 5) -> dict[str, Any]:
    """``raw`` with short source training and trials; everything that defines the study stays."""
    out = copy.deepcopy(raw)
    for m in out["models"]:
        if isinstance(m.get("pretrain"), dict):
            m["pretrain"]["steps"] = pretrain_steps
            m["pretrain"]["batch_size"] = min(int(m["pretrain"].get("batch_size", 64)), 64)
    for regime in out["regimes"].values():
        if "steps" in regime:
            regime["steps"] = steps
        if regime.get("eval_every"):
            regime["eval_every"] = eval_every
    return out


def keep_models(names: list[str]) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["models"] = [m for m in raw["models"] if m["name"] in names]
    return edit


def keep_seeds(seeds: list[int]) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["seeds"] = seeds
    return edit


# file -> (edit beyond shortening, report headings it must have, figures it must write)
FILES: dict[str, tuple[Callable[[dict[str, Any]], None] | None, list[str], list[str]]] = {
    "convergence.yaml": (None, ["## Convergence", "## Schedule length"], ["fig_convergence", "fig_schedule_gap"]),
    "datasize.yaml": (keep_seeds([0, 1]), ["## Training-set size"], ["fig_datasize"]),
    "regularizers.yaml": (keep_models(["recipe", "no-dropout", "bn-scale-fixed"]), ["## Source-training regularisers"],
                          ["fig_regularizers"]),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_offline_study_file_runs_and_reports_its_section(name, tmp_path, ray_local):
    from xfer.sweep import run_sweep
    from xfer.tracking import writer

    edit, headings, figures = FILES[name]
    raw = yaml.safe_load((SWEEPS / name).read_text())
    raw = shorten(raw)
    if edit is not None:
        edit(raw)
    raw["storage"], raw["data_root"] = str(tmp_path / "store"), str(tmp_path / "data")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(path)
    out = io.StringIO()
    result = run_sweep(spec, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", report_dir=str(tmp_path / "report"),
                       quiet=True, stream=out)
    writer._ACTIVE_PARENTS.clear()
    log = out.getvalue()
    failed = sum(s.statuses.get("failed", 0) for s in result.stages)
    assert failed == 0, log
    md = (tmp_path / "report" / "report.md").read_text()
    for h in headings:
        assert h in md, f"{name}: the report lacks {h!r}\n{log}"
    for f in figures:
        assert f in result.report["files"] and Path(result.report["files"][f]).stat().st_size > 0, f"{name}: {f}"
