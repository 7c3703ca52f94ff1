"""ASHA early stopping for the grid (``search: {type: asha}``): spec validation, the per-cell scheduler,
the comparison of ASHA's picks with the full grid's on hand-made tables, and a real sweep (local Ray,
SQLite MLflow, timm, torch) where ASHA stops a trial, records it as stopped, never selects it, and the
audit runs it to the end for the report's agreement figure."""
from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml

from xfer.spec import SpecError, load_spec, parse_spec

BASE = {"name": "asha", "models": [{"name": "res", "arch": "test_resnet", "input_size": 32, "weights": "random"}],
        "datasets": ["digits"],
        "regimes": {"finetune": {"grid": {"lr": [0.1, 0.03, 1e-6], "wd": [0.0]}, "steps": 12, "batch_size": 16,
                                 "eval_every": 4}}}
ASHA = {"type": "asha", "grace_steps": 4, "reduction_factor": 3}


# ------------------------------------------------------------------ spec
def test_spec_asha_defaults_and_errors():
    spec = parse_spec({**BASE, "search": ASHA})
    assert dict(spec.search) == {**ASHA, "audit": False}
    bad = [({"type": "asha"}, r"grace_steps: required for asha"),
           ({**ASHA, "num_samples": 3}, r"unknown key.*valid keys: type, grace_steps, reduction_factor, audit"),
           ({**ASHA, "grace_steps": 12}, r"grace_steps: must be below the steps of every finetune trial \(the fewest: 12\)"),
           ({**ASHA, "reduction_factor": 1}, r"reduction_factor: a number > 1"),
           ({**ASHA, "audit": "yes"}, r"audit: true .* or false"),
           ({"type": "hyperband"}, r"search.type: valid: grid, optuna, asha")]
    for search, match in bad:
        with pytest.raises(SpecError, match=match):
            parse_spec({**BASE, "search": search})
    no_eval = {**BASE, "regimes": {"finetune": {**BASE["regimes"]["finetune"], "eval_every": 0}}, "search": ASHA}
    with pytest.raises(SpecError, match=r"regimes.finetune.eval_every: search type asha needs validation"):
        parse_spec(no_eval)
    batched = {**BASE, "regimes": {"finetune": {**BASE["regimes"]["finetune"], "trials_per_task": 3}}, "search": ASHA}
    with pytest.raises(SpecError, match=r"trials_per_task: must be 1 under search type asha"):
        parse_spec(batched)
    probe_only = {**BASE, "regimes": {"linear_probe": {"grid": {"l2": [0.1]}}}, "search": ASHA}
    with pytest.raises(SpecError, match=r"asha stops step-trained regimes early \(finetune, scratch\)"):
        parse_spec(probe_only)
    # a schedule multiplies the steps: grace must be below the shortest schedule's
    short = {**BASE, "regimes": {"finetune": {**BASE["regimes"]["finetune"],
                                              "grid": {"lr": [0.1], "wd": [0.0], "schedule": [0.25, 1]}}}}
    with pytest.raises(SpecError, match=r"the fewest: 3\), got 4"):
        parse_spec({**short, "search": ASHA})


# ------------------------------------------------------------------ the scheduler: per cell
def test_cell_asha_compares_trials_only_within_their_cell():
    from ray.tune.schedulers import TrialScheduler

    from xfer.asha import CellASHA
    from xfer.tracking.writer import STEP, VAL

    spec = parse_spec({**BASE, "datasets": ["digits", "synthetic_near"], "search": ASHA})
    trials = spec.grid_trials()  # 2 datasets x 3 lr
    sched = CellASHA(grace_steps=4, reduction_factor=3)
    ray_trials = [SimpleNamespace(trial_id=f"t{i}", config={"trial": t.to_dict()}) for i, t in enumerate(trials)]
    for rt in ray_trials:
        sched.on_trial_add(None, rt)
    digits, near = ray_trials[:3], ray_trials[3:]
    go = TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, digits[0], {STEP: 4, VAL: 0.9}) == go  # first at its rung: goes on
    assert sched.on_trial_result(None, near[0], {STEP: 4, VAL: 0.2}) == go  # another cell: not judged by 0.9
    assert sched.on_trial_result(None, digits[1], {STEP: 4, "train_loss": 2.0}) == go  # no validation: no decision
    assert sched.on_trial_result(None, digits[1], {STEP: 4, VAL: 0.5}) == TrialScheduler.STOP
    assert sched.stopped == {trials[1].key: (4, 0.5)}
    # the final result (no xfer_val) never stops a trial, even at max_t
    assert sched.on_trial_result(None, digits[0], {STEP: 12, "xfer_final": True}) == go


# ------------------------------------------------------------------ the comparison on hand-made tables
def _table(trials, rows: dict) -> pd.DataFrame:
    """Runs table rows: ``rows[(stage, lr)] = (status, val, test)``."""
    out = []
    for i, ((stage, lr), (status, val, test)) in enumerate(rows.items()):
        t = next(t for t in trials if t.hparams["lr"] == lr)
        key = t.key if stage == "grid" else replace(t, stage="final").key
        out.append({"run_id": f"{stage}{i}", "trial_key": key, "model": t.model.name, "dataset": t.dataset.display,
                    "regime": t.regime, "stage": stage, "status": status, "metric": "top1", "val": val,
                    "test": test, "source_top1": math.nan, "seed": 0, "lr": lr, "wd": 0.0, "schedule": 1.0,
                    "train_size": 0.0, "start_time": pd.Timestamp(1_700_000_000_000 + i, unit="ms", tz="UTC")})
    df = pd.DataFrame(out)
    df["seed"] = df["seed"].astype("Int64")
    return df


def test_comparison_and_summary_on_hand_made_tables(tmp_path):
    from xfer import report_asha
    from xfer.report import _Doc

    spec = parse_spec({**BASE, "search": ASHA})
    trials = spec.grid_trials()  # lr 0.1, 0.03, 1e-6 (budgets: 20 steps each, say)
    budgets = {t.key: 20 for t in trials}
    k = {t.hparams["lr"]: t.key for t in trials}
    # audited: ASHA stopped 0.03 (at 4) and 1e-6 (at 8); run to the end, 0.03 is the grid's best
    runs = _table(trials, {("grid", 0.1): ("finished", 0.80, math.nan), ("grid", 0.03): ("finished", 0.90, math.nan),
                           ("grid", 1e-6): ("finished", 0.10, math.nan), ("final", 0.1): ("finished", math.nan, 0.75),
                           ("final", 0.03): ("finished", math.nan, 0.78)})
    stops = {k[0.03]: 4, k[1e-6]: 8}
    table = report_asha.comparison(runs, stops, budgets, trials)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["asha_config"], row["grid_config"], bool(row["same"]), bool(row["audited"])) == \
        ("lr=0.1 wd=0", "lr=0.03 wd=0", False, True)
    assert row["abs_delta_points"] == pytest.approx(3.0)
    assert (row["asha_steps"], row["grid_steps"], row["n_stopped"]) == (20 + 4 + 8, 60, 2)
    s = report_asha.summary(table)
    assert (s["cells"], s["same"], s["stopped"]) == (1, 0, 2)
    assert s["max_abs_delta_points"] == pytest.approx(3.0) and s["steps_saved"] == pytest.approx(1 - 32 / 60)
    assert "same pick in 0 of 1 audited cells" in report_asha.headline(s)

    # ASHA stopped only the bad lr: the same pick, Δ 0
    same = report_asha.comparison(runs, {k[1e-6]: 4}, budgets, trials)
    assert bool(same.iloc[0]["same"]) and same.iloc[0]["abs_delta_points"] == 0.0
    # not audited: the stopped trial is still `stopped` — its steps count, the cell not in the agreement
    open_ = _table(trials, {("grid", 0.1): ("finished", 0.80, math.nan), ("grid", 0.03): ("stopped", 0.3, math.nan),
                            ("grid", 1e-6): ("finished", 0.10, math.nan), ("final", 0.1): ("finished", math.nan, 0.75)})
    t2 = report_asha.comparison(open_, {k[0.03]: 4}, budgets, trials)
    assert not bool(t2.iloc[0]["audited"]) and t2.iloc[0]["grid_config"] == "lr=0.1 wd=0"  # stopped: never selected
    s2 = report_asha.summary(t2)
    assert (s2["cells"], s2["unaudited_cells"], s2["asha_steps"]) == (0, 1, 44)

    doc = _Doc("t")
    files = report_asha.render(table, doc, tmp_path)
    assert files["fig_asha"].stat().st_size > 0
    assert json.loads(files["asha_json"].read_text())["same"] == 0
    assert "## Early stopping (ASHA)" in doc.markdown()


# ------------------------------------------------------------------ a real sweep
def _grid_runs(uri: str) -> dict[float, mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("asha")
    runs = client.search_runs([exp.experiment_id], "tags.`xfer.stage` = 'grid'")
    return {float(r.data.params["lr"]): r for r in runs}


@pytest.mark.integration
def test_asha_sweep_stops_records_audits_and_reports(tmp_path: Path, ray_local):
    from xfer import select, tracking
    from xfer.sweep import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = {**BASE, "max_concurrent": 2, "resources": {"finetune": {"cpu": 1}},
           "storage": str(tmp_path / "store"), "data_root": str(tmp_path / "data")}
    path = tmp_path / "spec.yaml"
    # 1. ASHA alone: lr 1e-6 comes last, when both others have passed the first rung, and stays at chance
    path.write_text(yaml.safe_dump({**raw, "search": ASHA, "final": {"enabled": False}}))
    out = io.StringIO()
    run_sweep(load_spec(path), tracking_uri=uri, stream=out)
    runs = _grid_runs(uri)
    stopped = {lr: r for lr, r in runs.items() if r.data.tags["xfer.status"] == "stopped"}
    assert stopped, out.getvalue()
    assert 1e-6 in stopped, out.getvalue()
    for r in stopped.values():
        assert r.info.status == "KILLED"  # never shown as a finished trial
        assert 0 < int(r.data.tags["xfer.asha_stopped_step"]) < 12
        assert r.data.tags["xfer.message"].startswith("ASHA stopped it at step")
    assert not tracking.finished_keys(uri, "asha") & {r.data.tags["xfer.trial_key"] for r in stopped.values()}
    sel = select.select_best(tracking.load_runs(uri, "asha"), trials=load_spec(path).grid_trials())
    assert sel.iloc[0]["status"] == "selected"
    assert sel.iloc[0]["trial_key"] not in {r.data.tags["xfer.trial_key"] for r in stopped.values()}
    assert f"stopped {len(stopped)}" in out.getvalue()

    # 2. the same sweep with audit: ASHA's decisions stand, the stopped trials run to the end, both picks tested
    path.write_text(yaml.safe_dump({**raw, "search": {**ASHA, "audit": True}}))
    out = io.StringIO()
    result = run_sweep(load_spec(path), tracking_uri=uri, report_dir=str(tmp_path / "report"), stream=out)
    assert f"grid-asha: 3 trials — 3 done, 0 to run" in out.getvalue()
    runs = _grid_runs(uri)
    assert len(runs) == 3  # one run per key: the audit logged into the stopped runs
    for lr, r in runs.items():
        assert r.data.tags["xfer.status"] == "finished"
        assert ("xfer.asha_stopped_step" in r.data.tags) == (lr in stopped)  # the record that ASHA stopped it stays
    vals = {lr: r.data.metrics["val_top1"] for lr, r in runs.items()}
    grid_pick = max(vals, key=lambda lr: (round(vals[lr], 12), -lr))  # ties: the smaller lr (its `prefer`)
    asha_vals = {lr: v for lr, v in vals.items() if lr not in stopped}
    asha_pick = max(asha_vals, key=lambda lr: (round(asha_vals[lr], 12), -lr))
    summary = json.loads(Path(result.report["files"]["asha_json"]).read_text())
    assert (summary["cells"], summary["same"], summary["stopped"]) == (1, int(grid_pick == asha_pick), len(stopped))
    assert summary["asha_steps"] == 12 * (3 - len(stopped)) + sum(
        int(r.data.tags["xfer.asha_stopped_step"]) for r in stopped.values())
    finals = [r for r in mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("asha").experiment_id], "tags.`xfer.stage` = 'final'")]
    assert {float(r.data.params["lr"]) for r in finals} == {grid_pick, asha_pick}
    report_md = Path(result.report["files"]["report_md"]).read_text()
    assert "## Early stopping (ASHA)" in report_md and "fig_asha.png" in report_md
    assert Path(result.report["files"]["fig_asha"]).stat().st_size > 0
    assert "asha: same pick in" in out.getvalue()
