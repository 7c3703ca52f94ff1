"""Malformed input through the real command line, in-process (``xfer.cli.main(argv)``): each case
names its input, the message fragment(s) the user must see, and the exit code. No case may print a
traceback, and ``xfer sweep`` must refuse a bad sweep file before it starts Ray or touches storage.

Plus selection's handling of diverged trials through the real tracking path (TrackingCallback →
MLflow → load_runs → select_best), which tests/test_select.py covers only on hand-made tables."""
from __future__ import annotations

import copy
import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

GOOD: dict[str, Any] = {
    "name": "bad-calls",
    "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
    "datasets": ["digits"],
    "regimes": {"linear_probe": {"grid": {"l2": [1.0]}}},
}
CSV_HEADER = "model,dataset,regime,source_top1,metric,value\n"
CSV_GOOD_ROWS = "a,digits,finetune,0.7,top1,0.9\nb,digits,finetune,0.8,top1,0.92\n"


def spec_with(**changes: Any) -> dict[str, Any]:
    """GOOD with top-level keys replaced (a value of ``None`` removes the key)."""
    raw = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


def lp(**grid: Any) -> dict[str, Any]:
    return {"linear_probe": {"grid": grid}}


@dataclass
class Case:
    argv: list[str]  # "{dir}" is the case's folder; "{file}" the file written from ``content``
    expect: tuple[str, ...]  # fragments of stderr (+ stdout)
    code: int = 2
    content: str | bytes | dict | None = None  # a dict is dumped as YAML
    suffix: str = ".yaml"
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # paths (under the case's folder) the call must not create


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEAD = f"http://127.0.0.1:{_free_port()}"  # nothing listens there

PLAN = ["plan", "{file}"]
SWEEP = ["sweep", "{file}", "--storage", "{dir}/storage", "--tracking-uri", "sqlite:///{dir}/mlflow.db"]
TRIAL = ["trial", "--model", "test_resnet", "--weights", "random", "--dataset", "digits", "--storage", "{dir}/s"]
CSV = ["report", "--from-csv", "{file}", "--out", "{dir}/out"]

CASES: dict[str, Case] = {
    # ---- sweep files, through `xfer plan`
    "plan: no such file": Case(["plan", "{dir}/nope.yaml"], ("nope.yaml: no such sweep file",)),
    "plan: empty file": Case(PLAN, ("input.yaml: the file is empty", "name, models, datasets and regimes"),
                             content=""),
    "plan: YAML syntax error": Case(PLAN, ("not valid YAML", "line 2"), content="name: x\nmodels: [a, b\n"),
    "plan: !!python/object tag": Case(PLAN, ("not valid YAML", "could not determine a constructor"),
                                      content="name: !!python/object/apply:os.getcwd []\n"),
    "plan: a list at the top": Case(PLAN, ("expected a mapping at the top level",), content="- a\n- b\n"),
    "plan: unknown top-level key": Case(PLAN, ("modles", "models"), content=spec_with(modles=[])),
    "plan: seeds of the wrong type": Case(PLAN, ("spec.seeds", "a non-empty list of integers"),
                                          content=spec_with(seeds="zero")),
    "plan: models not a list": Case(PLAN, ("spec.models", "a non-empty list"), content=spec_with(models="m")),
    "plan: no regimes": Case(PLAN, ("spec.regimes", "required"), content=spec_with(regimes=None)),
    "plan: empty grid axis": Case(PLAN, ("spec.regimes.linear_probe.grid.l2",), content=spec_with(regimes=lp(l2=[]))),
    "plan: non-numeric grid value": Case(PLAN, ("spec.regimes.linear_probe.grid.l2",),
                                         content=spec_with(regimes=lp(l2=["abc"]))),
    "plan: logspace with two numbers": Case(PLAN, ("spec.regimes.linear_probe.grid.l2", "logspace"),
                                            content=spec_with(regimes=lp(l2={"logspace": [1, 2]}))),
    "plan: negative penalty": Case(PLAN, ("spec.regimes.linear_probe.grid.l2",),
                                   content=spec_with(regimes=lp(l2=[-1.0]))),
    "plan: axis of another regime": Case(PLAN, ("spec.regimes.linear_probe.grid", "lr", "l2"),
                                         content=spec_with(regimes=lp(l2=[1.0], lr=[0.1]))),
    "plan: unknown regime": Case(PLAN, ("spec.regimes.ridge", "linear_probe", "finetune"),
                                 content=spec_with(regimes={"ridge": {"grid": {"l2": [1.0]}}})),
    "plan: unknown regime option": Case(PLAN, ("spec.regimes.linear_probe", "colour"),
                                        content=spec_with(regimes={"linear_probe": {"grid": {"l2": [1.0]},
                                                                                    "colour": "red"}})),
    "plan: negative steps": Case(PLAN, ("spec.regimes.finetune", "steps"),
                                 content=spec_with(regimes={"finetune": {"grid": {"lr": [0.1], "wd": [0.0]},
                                                                         "steps": -5}})),
    "plan: unknown model architecture": Case(PLAN, ("spec.models[0]", "not_a_net"),
                                             content=spec_with(models=[{"name": "m", "arch": "not_a_net",
                                                                        "weights": "random"}])),
    "plan: unknown dataset": Case(PLAN, ("spec.datasets[0]", "no_such_data", "digits"),
                                  content=spec_with(datasets=["no_such_data"])),
    "plan: unknown plugin": Case(PLAN, ("spec.plugins[0]", "cannot import plugin module 'no_such_plugin'"),
                                 content=spec_with(plugins=["no_such_plugin"])),
    "plan: sweep name with ../": Case(PLAN, ("spec.name", "../escape"), content=spec_with(name="../escape")),
    "plan: resources of an unknown regime": Case(PLAN, ("spec.resources.ridge",),
                                                 content=spec_with(resources={"ridge": {"cpu": 1}})),
    "plan: max_concurrent 0": Case(PLAN, ("spec.max_concurrent", ">= 1"), content=spec_with(max_concurrent=0)),
    "plan: credentials in tracking_uri": Case(PLAN, ("spec.tracking_uri: must not carry credentials", "u:***@"),
                                              content=spec_with(tracking_uri="http://u:hunter2@h:5000")),
    # ---- `xfer sweep`: refused before Ray starts (checked below)
    "sweep: unknown top-level key": Case(SWEEP, ("modles",), content=spec_with(modles=[])),
    "sweep: sweep name with ../": Case(SWEEP, ("spec.name", "../escape"), content=spec_with(name="../escape")),
    "sweep: no such file": Case(["sweep", "{dir}/nope.yaml"], ("no such sweep file",)),
    "sweep: unreachable tracking server": Case(["sweep", "{file}", "--storage", "{dir}/storage",
                                                "--tracking-uri", DEAD], ("cannot reach the MLflow tracking server",),
                                               content=GOOD),
    "sweep: --max-concurrent not a number": Case(SWEEP + ["--max-concurrent", "many"],
                                                 ("--max-concurrent", "invalid int value"), content=GOOD),
    # ---- `xfer trial`
    "trial: missing --dataset": Case(["trial", "--model", "test_resnet", "--regime", "linear_probe"],
                                     ("the following arguments are required: --dataset",)),
    "trial: missing --regime": Case(["trial", "--model", "test_resnet", "--dataset", "digits"],
                                    ("the following arguments are required: --regime",)),
    "trial: unknown regime": Case(TRIAL + ["--regime", "ridge"], ("--regime", "ridge", "linear_probe")),
    "trial: hyper-parameter of another regime": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--lr", "0.1"],
                                                     ("--lr does not apply to regime 'linear_probe'", "--l2")),
    "trial: missing hyper-parameter": Case(TRIAL + ["--regime", "finetune", "--lr", "0.1"],
                                           ("--wd is required for regime 'finetune'",)),
    "trial: hyper-parameter not a number": Case(TRIAL + ["--regime", "finetune", "--lr", "fast", "--wd", "0"],
                                                ("--lr", "invalid float value: 'fast'")),
    "trial: negative learning rate": Case(TRIAL + ["--regime", "finetune", "--lr", "-1", "--wd", "0"],
                                          ("error: --lr: lr must be > 0, got -1.0",)),
    "trial: negative --steps": Case(TRIAL + ["--regime", "finetune", "--lr", "0.1", "--wd", "0", "--steps", "-3"],
                                    ("steps", "must be >= 1")),
    "trial: bad option value": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--option", "max_iter=lots"],
                                    ("max_iter", "'lots'")),
    "trial: unknown option": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--option", "colour=red"],
                                  ("colour",)),
    "trial: option without =": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--option", "colour"],
                                    ("--option expects KEY=VALUE",)),
    "trial: bad --stage": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--stage", "test"],
                               ("--stage", "invalid choice: 'test'")),
    "trial: unknown dataset": Case(["trial", "--model", "test_resnet", "--weights", "random", "--dataset", "nodata",
                                    "--regime", "linear_probe", "--l2", "1"], ("nodata", "digits")),
    "trial: unknown dataset option": Case(TRIAL + ["--regime", "linear_probe", "--l2", "1", "--dataset-option",
                                                   "colour=red"], ("colour",)),
    "trial: unknown architecture": Case(["trial", "--model", "not_a_net", "--weights", "random", "--dataset",
                                         "digits", "--regime", "linear_probe", "--l2", "1"], ("not_a_net",)),
    "trial: missing weights file": Case(["trial", "--model", "test_resnet", "--weights", "{dir}/nope.pth",
                                         "--dataset", "digits", "--regime", "finetune", "--lr", "0.1", "--wd", "0"],
                                        ("--weights: no such weights file", "nope.pth")),
    # ---- `xfer report --from-csv`
    "report: missing columns": Case(CSV, ("missing required column(s) source_top1, metric, value",),
                                    content="model,dataset,regime\na,digits,finetune\n", suffix=".csv"),
    "report: value out of range": Case(CSV, ("column 'value' must hold fractions in [0, 1]",),
                                       content=CSV_HEADER + "a,digits,finetune,0.7,top1,-0.2\n"
                                                            "b,digits,finetune,0.8,top1,0.9\n", suffix=".csv"),
    "report: source_top1 out of range": Case(CSV, ("column 'source_top1'",),
                                             content=CSV_HEADER + "a,digits,finetune,170,top1,0.9\n"
                                                                  "b,digits,finetune,0.8,top1,0.9\n", suffix=".csv"),
    "report: non-numeric value": Case(CSV, ("column 'value' has non-numeric values", "'high'"),
                                      content=CSV_HEADER + "a,digits,finetune,0.7,top1,high\n", suffix=".csv"),
    "report: duplicate rows": Case(CSV, ("more than one row for the same (model, dataset, regime)", "a / digits / finetune"),
                                   content=CSV_HEADER + CSV_GOOD_ROWS + "a,digits,finetune,0.7,top1,0.8\n",
                                   suffix=".csv"),
    "report: header only": Case(CSV, ("the table has no rows",), content=CSV_HEADER, suffix=".csv"),
    "report: empty file": Case(CSV, ("not a readable CSV file",), content="", suffix=".csv"),
    "report: not a CSV (binary)": Case(CSV, ("not a readable CSV file",), content=bytes(range(256)) * 4,
                                       suffix=".png"),
    "report: not a CSV (YAML)": Case(CSV, ("missing required column(s)",), content=GOOD, suffix=".yaml"),
    "report: no such file": Case(["report", "--from-csv", "{dir}/nope.csv"], ("nope.csv: no such results file",)),
    "report: --experiment in a database that does not exist": Case(
        ["report", "--experiment", "nobody", "--tracking-uri", "sqlite:///{dir}/mlflow.db", "--out", "{dir}/out"],
        ("no MLflow database at", "mlflow.db"), absent=("mlflow.db",)),
    "report: --experiment that does not exist": Case(
        ["report", "--experiment", "nobody", "--tracking-uri", "sqlite:///{dir}/input.db", "--out", "{dir}/out"],
        ("no MLflow experiment named 'nobody'", "experiments there: Default"), content=b"", suffix=".db"),
    "report: unknown metric": Case(CSV, ("metric", "accuracy", "top1"),
                                   content=CSV_HEADER + "a,digits,finetune,0.7,accuracy,0.9\n"
                                                        "b,digits,finetune,0.8,accuracy,0.9\n",
                                   suffix=".csv"),
    "report: unreachable server": Case(["report", "--experiment", "x", "--tracking-uri", DEAD],
                                       ("cannot reach the MLflow tracking server",)),
    "report: neither --experiment nor --from-csv": Case(["report"], ("one of the arguments --experiment --from-csv is required",)),
    "report: both --experiment and --from-csv": Case(["report", "--experiment", "x", "--from-csv", "y.csv"],
                                                     ("not allowed with argument",)),
    # ---- `xfer submit`
    "submit: no such spec": Case(["submit", "{dir}/nope.yaml", "--dry-run"], ("no such sweep file",)),
    "submit: missing spec argument": Case(["submit"], ("the following arguments are required: spec",)),
    "submit: --workers 0": Case(["submit", "{file}", "--spec-path", "sweeps/x.yaml", "--dry-run", "--workers", "0"],
                                ("--workers must be >= 1",), content=GOOD),
    "submit: --min-workers above --workers": Case(["submit", "{file}", "--spec-path", "s.yaml", "--dry-run",
                                                   "--workers", "2", "--min-workers", "5"],
                                                  ("--min-workers must be between 0 and --workers",), content=GOOD),
    "submit: bad namespace": Case(["submit", "{file}", "--spec-path", "s.yaml", "--dry-run", "--namespace", "Bad_NS"],
                                  ("--namespace 'Bad_NS'", "DNS-1123"), content=GOOD),
    "submit: --gpus-per-worker not a number": Case(["submit", "{file}", "--gpus-per-worker", "one"],
                                                   ("--gpus-per-worker", "invalid int value"), content=GOOD),
    "submit: tracking URI not a URI": Case(["submit", "{file}", "--spec-path", "s.yaml", "--dry-run",
                                            "--tracking-uri", "mlflow-host"], ("--tracking-uri 'mlflow-host'",),
                                           content=GOOD),
    "submit: local absolute path without --spec-path": Case(["submit", "{file}", "--dry-run"],
                                                            ("is a path on this machine", "--spec-path"), content=GOOD),
    "submit: no kube-config": Case(["submit", "{file}", "--spec-path", "s.yaml", "--no-follow"],
                                   ("no Kubernetes configuration found", "--dry-run"), content=GOOD,
                                   env={"KUBECONFIG": "{dir}/no-kubeconfig", "HOME": "{dir}"}),
}


def _fill(text: str, d: Path, f: Path) -> str:
    return text.replace("{dir}", str(d)).replace("{file}", str(f))


def run_case(case: Case, tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    from xfer.cli import main

    f = tmp_path / f"input{case.suffix}"
    if isinstance(case.content, dict):
        f.write_text(yaml.safe_dump(case.content))
    elif isinstance(case.content, bytes):
        f.write_bytes(case.content)
    elif case.content is not None:
        f.write_text(case.content)
    for k, v in case.env.items():
        monkeypatch.setenv(k, _fill(v, tmp_path, f))
    for k in ("KUBERNETES_SERVICE_HOST", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        code = main([_fill(a, tmp_path, f) for a in case.argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_call(name, tmp_path, monkeypatch, capsys):
    import ray

    case = CASES[name]
    code, text = run_case(case, tmp_path, monkeypatch, capsys)
    assert "Traceback" not in text, text
    for fragment in case.expect:
        assert fragment in text, f"{name}: expected {fragment!r} in:\n{text}"
    assert code == case.code, f"{name}: exit {code}, expected {case.code}:\n{text}"
    assert text.count("error") >= 1, text
    if case.argv[0] == "sweep":
        assert not ray.is_initialized(), f"{name}: Ray was started for a sweep that cannot run"
        case.absent += ("storage", "mlflow.db")
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), f"{name}: created {rel}"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


# ------------------------------------------------------------------ diverged trials, through MLflow
def _fake_trial(t, trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"trial": t.to_dict()}, error_file=None)


def test_diverged_runs_tracked_in_mlflow_are_never_selected(tmp_path):
    """Diverged runs logged by the real callback (with a bogus high ``val_top1``, as a run can have from
    before it diverged) are never chosen; a cell whose every run diverged is ``missing``, and its
    results row says so instead of reporting a number."""
    from xfer import tracking
    from xfer.contract import TrialRecord
    from xfer.select import results_table, select_best
    from xfer.spec import parse_spec
    from xfer.tracking.writer import FINAL, RECORD, STEP, SweepTracker, TrackingCallback

    spec = parse_spec({"name": "div", "models": [{"name": "a", "arch": "test_resnet", "weights": "random"},
                                                   {"name": "b", "arch": "test_byobnet", "weights": "random"}],
                       "datasets": ["digits"], "regimes": {"finetune": {"grid": {"lr": [0.01, 0.1, 1.0], "wd": [0.0]}}}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "div")
    tracker.start_parent({"total": 6})
    cb = TrackingCallback(tracker)
    trials = spec.grid_trials()
    for i, t in enumerate(trials):
        # model a: lr=1.0 diverged (after a high val); model b: everything diverged
        diverged = t.model.name == "b" or t.hparams["lr"] == 1.0
        val = 0.99 if diverged else 0.5 + t.hparams["lr"]
        rec = TrialRecord(status="diverged" if diverged else "finished", metric="top1",
                          metrics={"val_top1": val}, steps_done=4, message="loss is nan" if diverged else "")
        tr = _fake_trial(t, f"t{i}")
        cb.on_trial_start(iteration=0, trials=[], trial=tr)
        cb.on_trial_result(iteration=0, trials=[], trial=tr,
                           result={FINAL: True, STEP: 4, RECORD: json.dumps(rec.to_json())})
    tracker.end_parent()

    runs = tracking.load_runs(uri, "div")
    assert sorted(runs["status"]) == ["diverged"] * 4 + ["finished"] * 2
    sel = select_best(runs, trials=trials)
    a = sel[sel.model == "a"].iloc[0]
    assert a.status == "selected" and a.lr == pytest.approx(0.1) and a.n_finished == 2 and a.n_trials == 3
    b = sel[sel.model == "b"].iloc[0]
    assert b.status == "missing" and b.n_trials == 3 and b.n_finished == 0 and math.isnan(b.val)
    res = results_table(runs, sel)  # no final runs: each cell says why it has no value
    row_b = res[res.model == "b"].iloc[0]
    assert row_b.status != "selected" and math.isnan(row_b.value)
