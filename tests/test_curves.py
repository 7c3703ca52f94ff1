"""Cell axes (schedule length, training-set size) and the report's convergence / schedule / data-size views.

Pure pieces on hand-made data (steps to 90 % of the final log-odds, class-balanced subsets, selection
per cell point, the report sections from a results table), the regime on a tiny CPU trial, and the
curves coming back from a real MLflow store (temp SQLite) into ``xfer report``'s path.
"""
from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from xfer.data.subset import class_balanced_indices
from xfer.regimes import REGIMES
from xfer.report_curves import (cell_axis_columns, convergence_table, datasize_table, main_cells, schedule_gap,
                                steps_to_fraction)
from xfer.select import final_trials, results_table, select_best
from xfer.spec import SpecError, parse_spec, plan
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

MODEL = ModelSpec(name="m", arch="test_resnet", weights="random", input_size=32, source_top1=0.5)


# ------------------------------------------------------------------ steps to 90 % of the final log-odds
def test_steps_to_fraction_on_hand_made_curves():
    steps = [10, 20, 30, 40]
    assert steps_to_fraction(steps, [0.0, 1.0, 1.8, 2.0]) == 30  # 0.9 × 2.0 = 1.8 reached exactly at 30
    assert steps_to_fraction(steps, [0.0, 1.0, 1.79, 2.0]) == 40  # just short of it: only the last point
    assert steps_to_fraction(steps, [1.9, 1.0, 1.5, 2.0]) == 10  # the first evaluated point already reaches it
    assert steps_to_fraction([40, 10, 30, 20], [2.0, 0.0, 1.8, 1.0]) == 30  # order of the points does not matter
    assert steps_to_fraction(steps, [0.0, 1.0, 1.8, 2.0], fraction=0.5) == 20
    # a faster curve to the same final value needs fewer steps
    assert steps_to_fraction(steps, [1.0, 1.9, 2.0, 2.0]) < steps_to_fraction(steps, [0.2, 0.5, 1.0, 2.0])
    # final log-odds at or below 0 (accuracy <= 50 %): 90 % of it is meaningless
    assert math.isnan(steps_to_fraction(steps, [-3.0, -2.0, -1.5, -1.0]))
    assert math.isnan(steps_to_fraction(steps, [-1.0, -0.5, 0.0, 0.0]))
    # ... unless progress is measured from a baseline below it (e.g. chance)
    assert steps_to_fraction(steps, [-3.0, -2.0, -1.2, -1.0], baseline=-3.0) == 30
    assert math.isnan(steps_to_fraction([], []))
    assert steps_to_fraction([10, 20, 30], [0.5, float("nan"), 1.0]) == 30  # a NaN point is skipped
    with pytest.raises(ValueError, match="differ in length"):
        steps_to_fraction([1, 2], [1.0])
    with pytest.raises(ValueError, match="fraction"):
        steps_to_fraction([1], [1.0], fraction=0)


# ------------------------------------------------------------------ class-balanced subsets
def test_class_balanced_subsets_are_balanced_seeded_and_nested():
    labels = np.repeat(np.arange(4), [30, 20, 12, 5])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    small = class_balanced_indices(labels, 3, seed=0)
    large = class_balanced_indices(labels, 10, seed=0)
    assert np.bincount(labels[small], minlength=4).tolist() == [3, 3, 3, 3]
    assert np.bincount(labels[large], minlength=4).tolist() == [10, 10, 10, 5]  # a short class keeps all it has
    assert set(small) <= set(large)  # nested: more data, not other data
    assert np.array_equal(small, class_balanced_indices(labels, 3, seed=0))  # deterministic
    assert not np.array_equal(small, class_balanced_indices(labels, 3, seed=1))  # each seed its own draw
    assert np.all(np.diff(small) > 0)
    with pytest.raises(ValueError, match="multi-label"):
        class_balanced_indices(np.zeros((6, 3)), 2, seed=0)
    with pytest.raises(ValueError, match="integer >= 1"):
        class_balanced_indices(labels, 0, seed=0)


# ------------------------------------------------------------------ the axes: keys, spec, plan
def test_cell_axes_at_their_default_keep_the_trial_key():
    rule = REGIMES.get("finetune").key_rule
    plain = TrialSpec(MODEL, DatasetRef("digits"), "finetune", {"lr": 0.1, "wd": 0.0}, {"steps": 5}, key_rule=rule)
    explicit = TrialSpec(MODEL, DatasetRef("digits"), "finetune",
                         {"lr": 0.1, "wd": 0.0, "schedule": 1.0, "train_size": 0.0}, {"steps": 5}, key_rule=rule)
    longer = TrialSpec(MODEL, DatasetRef("digits"), "finetune", {"lr": 0.1, "wd": 0.0, "schedule": 2.0},
                       {"steps": 5}, key_rule=rule)
    smaller = TrialSpec(MODEL, DatasetRef("digits"), "finetune", {"lr": 0.1, "wd": 0.0, "train_size": 10.0},
                        {"steps": 5}, key_rule=rule)
    assert plain.key == explicit.key == TrialSpec.from_dict(explicit.to_dict()).key
    assert len({plain.key, longer.key, smaller.key}) == 3
    ft = REGIMES.get("finetune")
    assert ft.describe(explicit.hparams) == "lr=0.1 wd=0"  # run names unchanged at the defaults
    assert ft.describe(longer.hparams) == "lr=0.1 wd=0 schedule=2"
    assert ft.check_hparams({"lr": 0.1, "wd": 0.0}, "x") == {"lr": 0.1, "wd": 0.0, "schedule": 1.0, "train_size": 0.0}


def _spec(**grid) -> dict:
    return {"name": "cells", "seeds": [0, 1], "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
            "datasets": ["digits", "synthetic_near"],
            "regimes": {"finetune": {"grid": {"lr": [0.01, 0.1], "wd": [0], **grid}, "steps": 5},
                        "linear_probe": {"grid": {"l2": [1.0]}}}}


def test_spec_grid_and_plan_with_cell_axes():
    spec = parse_spec(_spec(schedule=[1, 2, 4], train_size=[10, 0]))
    ft = [t for t in spec.grid_trials() if t.regime == "finetune"]
    assert len(ft) == 2 * 2 * 2 * 3 * 2  # seeds × datasets × lr × schedule × size
    assert len({t.key for t in ft}) == len(ft)
    p = plan(spec)
    # a final trial per (model, dataset, seed) and cell point: 6 for finetune, 1 for the probe
    assert p["final"] == 1 * 2 * 2 * (3 * 2 + 1)
    plain = parse_spec(_spec())
    assert plan(plain)["final"] == 1 * 2 * 2 * 2
    assert all("schedule" not in t.hparams for t in plain.grid_trials())  # unnamed: the default, as before
    with pytest.raises(SpecError, match=r"spec.regimes.finetune.grid.schedule: a cell axis must include its "
                                        r"default 1"):
        parse_spec(_spec(schedule=[2, 4]))
    with pytest.raises(SpecError, match=r"grid.train_size: values must be an integer >= 0"):
        parse_spec(_spec(train_size=[2.5, 0]))
    with pytest.raises(SpecError, match=r"grid.schedule: values must be > 0"):
        parse_spec(_spec(schedule=[0, 1]))


# ------------------------------------------------------------------ selection per cell point
def _runs(trials, val_fn, stage="grid", test_fn=None, drop_axes=()) -> pd.DataFrame:
    rows = []
    for i, t in enumerate(trials):
        hp = {"schedule": 1.0, "train_size": 0.0, **t.hparams} if t.regime != "linear_probe" else dict(t.hparams)
        rows.append({"run_id": f"{stage}{i:03d}", "trial_key": t.key, "model": t.model.name,
                     "dataset": t.dataset.display, "regime": t.regime, "stage": stage, "status": "finished",
                     "metric": "top1", "val": val_fn(t) if stage == "grid" else math.nan,
                     "test": test_fn(t) if test_fn else math.nan, "source_top1": 0.5, "seed": t.seed,
                     "start_time": pd.Timestamp(1_700_000_000_000 + i, unit="ms", tz="UTC"),
                     **{a: hp.get(a, math.nan) for a in ("lr", "wd", "l2", "schedule", "train_size")
                        if a not in drop_axes}})
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    return df


def test_each_cell_point_is_selected_on_its_own_and_gets_its_own_final():
    spec = parse_spec(_spec(schedule=[1, 4]))
    grid = spec.grid_trials()

    def val(t):  # the best lr depends on the schedule: a longer schedule prefers the smaller lr
        if t.regime == "linear_probe":
            return 0.5
        good = 0.01 if t.hparams.get("schedule", 1.0) == 4 else 0.1
        return 0.8 if t.hparams["lr"] == good else 0.6

    sel = select_best(_runs(grid, val), trials=grid)
    ft = sel[sel.regime == "finetune"]
    assert len(ft) == 2 * 2 and (ft.status == "selected").all()  # datasets × schedules (seeds averaged)
    assert sorted(zip(ft.schedule, ft.lr)) == [(1.0, 0.1), (1.0, 0.1), (4.0, 0.01), (4.0, 0.01)]
    finals = final_trials(sel, grid)
    ft_final = [f for f in finals if f.regime == "finetune"]
    assert len(ft_final) == 2 * 2 * 2  # datasets × schedules × seeds
    assert {(f.hparams.get("schedule", 1.0), f.hparams["lr"]) for f in ft_final} == {(1.0, 0.1), (4.0, 0.01)}

    tests = {f.key: 0.7 + 0.1 * f.seed + (0.05 if f.hparams.get("schedule") == 4 else 0) for f in finals}
    res = results_table(_runs(finals, val, stage="final", test_fn=lambda t: tests[t.key]), sel)
    ft_res = res[res.regime == "finetune"]
    assert (ft_res.status == "finished").all() and (ft_res.n_seeds == 2).all()
    assert ft_res.value_sd.to_numpy() == pytest.approx([np.std([0.7, 0.8], ddof=1)] * 4)
    assert sorted(ft_res.value.round(6)) == pytest.approx([0.75, 0.75, 0.8, 0.8])
    assert set(ft_res.grid_run_id) <= set(_runs(grid, val).run_id)
    assert len(main_cells(res)) == 2 * 2  # finetune at 1× and the probe, per dataset


def test_runs_from_before_the_axis_read_as_its_default():
    spec = parse_spec(_spec())
    grid = spec.grid_trials()
    runs = _runs(grid, lambda t: 0.5 + (t.hparams.get("lr", 0) or 0), drop_axes=("schedule", "train_size"))
    sel = select_best(runs, trials=grid)
    ft = sel[sel.regime == "finetune"]
    assert (ft.schedule == 1.0).all() and (ft.train_size == 0.0).all() and (ft.lr == 0.1).all()
    assert sel[sel.regime == "linear_probe"].schedule.isna().all()


# ------------------------------------------------------------------ the report from a results table
def _results() -> tuple[pd.DataFrame, dict]:
    """Two models × two datasets: finetune/scratch at schedules 1, 2, 4 and sizes 5, 20, all; a curve per
    default-size row (fine-tuning converges by 20 % of the schedule, scratch at 80 %)."""
    rows, curves = [], {}
    for m, src in (("small", 0.6), ("big", 0.8)):
        for d in ("near", "far"):
            for regime in ("finetune", "scratch"):
                base = 0.85 if regime == "finetune" else 0.6
                for sched in (1.0, 2.0, 4.0):
                    value = base + (0.02 if regime == "finetune" else 0.08) * math.log2(sched) + (src - 0.7) / 10
                    rid = f"g-{m}-{d}-{regime}-{sched:g}"
                    rows.append(dict(model=m, dataset=d, regime=regime, source_top1=src, metric="top1", value=value,
                                     value_sd=math.nan, schedule=sched, train_size=0.0, grid_run_id=rid, n_seeds=1))
                    n = int(25 * sched)
                    knee = 0.2 if regime == "finetune" else 0.8
                    curves[rid] = [(s, min(value, 0.5 + (value - 0.5) * s / (knee * n))) for s in range(5, n + 1, 5)]
                for size in (5.0, 20.0):
                    value = base - (0.3 if regime == "scratch" else 0.1) * (5.0 / size)
                    rows.append(dict(model=m, dataset=d, regime=regime, source_top1=src, metric="top1", value=value,
                                     value_sd=0.02, schedule=1.0, train_size=size, grid_run_id=None, n_seeds=3))
    return pd.DataFrame(rows), curves


def test_views_from_a_results_table():
    from xfer import stats

    res, curves = _results()
    assert cell_axis_columns(res) == ["schedule", "train_size"]
    main = main_cells(res)
    assert len(main) == 2 * 2 * 2 and (main.schedule == 1).all() and (main.train_size == 0).all()

    conv = convergence_table(main, curves)
    assert len(conv) == 8
    ft, sc = conv[conv.regime == "finetune"], conv[conv.regime == "scratch"]
    assert (ft.steps_to_90 < sc.steps_to_90.min()).all()  # pre-trained converges faster
    assert ft.fraction_of_schedule.max() <= 0.25 and sc.fraction_of_schedule.min() >= 0.7

    gap = schedule_gap(res)
    assert len(gap) == 2 * 2 * 3 and (gap.regime_a == "finetune").all() and (gap.regime_b == "scratch").all()
    by_sched = gap.groupby("schedule").gap.mean()
    assert by_sched[1.0] > by_sched[2.0] > by_sched[4.0]  # scratch catches up with a longer schedule
    one = gap[(gap.model == "big") & (gap.dataset == "near") & (gap.schedule == 2.0)].iloc[0]
    vals = res[(res.model == "big") & (res.dataset == "near") & (res.schedule == 2.0) & (res.train_size == 0)]
    expect = stats.logit(vals[vals.regime == "finetune"].value.iloc[0]) - stats.logit(
        vals[vals.regime == "scratch"].value.iloc[0])
    assert one.gap == pytest.approx(expect)

    size = datasize_table(res)
    assert len(size) == 2 * 2 * 2 * 3 and sorted(size.train_size.unique()) == [0.0, 5.0, 20.0]
    assert size.train_size.tolist()[:3] == [5.0, 20.0, 0.0]  # "all" after the subsets
    assert size[size.train_size == 5.0].value_sd.eq(0.02).all()
    assert datasize_table(res[res.train_size == 0]).empty  # one size: nothing to plot
    assert schedule_gap(res[res.schedule == 1]).empty


def test_build_report_writes_the_views_and_reads_its_csv_back(tmp_path):
    from xfer.report import ResultsTableError, build_report, read_results_csv

    res, curves = _results()
    rep = build_report(res, tmp_path / "a", curves=curves, n_boot=200, title="cells")
    for name in ("fig_convergence", "fig_schedule_gap", "fig_datasize", "fig_correlation"):
        assert rep[name].is_file() and rep[name].stat().st_size > 5000, name
    md = rep["report_md"].read_text()
    for section in ("## Convergence", "## Schedule length", "## Training-set size", "## Headline"):
        assert section in md
    assert rep.headline["finetune"]["n_models"] == 2 and rep.headline["finetune"]["n_datasets"] == 2
    assert "fig_datasize.png" in md and "data:image/png;base64," in rep["report_html"].read_text()
    # results.csv keeps every cell; the report from it has the same views except the curves (MLflow only)
    again = build_report(read_results_csv(rep["results_csv"]), tmp_path / "b", n_boot=200)
    md2 = again["report_md"].read_text()
    assert "## Schedule length" in md2 and "## Training-set size" in md2 and "## Convergence" not in md2
    assert (again.headline["scratch"]["n_models"], again.headline["scratch"]["n_datasets"]) == (2, 2)
    with pytest.raises(ResultsTableError, match="more than one row .*schedule, train_size"):
        build_report(pd.concat([res, res.iloc[:1]]), tmp_path / "c")
    with pytest.raises(ResultsTableError, match="no row has every cell axis"):
        build_report(res[res.train_size > 0], tmp_path / "d")


# ------------------------------------------------------------------ the regime on a tiny CPU trial
def test_finetune_runs_the_schedule_and_the_subset(tmp_path, monkeypatch):
    from xfer import engine
    from xfer.contract import RunContext
    from xfer.regimes import run_trial

    seen: list[int] = []
    train = engine.train

    def spy(model, data, *args, **kw):
        seen.append(len(data))
        return train(model, data, *args, **kw)

    monkeypatch.setattr(engine, "train", spy)
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path)
    rule = REGIMES.get("scratch").key_rule
    opts = {"steps": 3, "batch_size": 8, "checkpoint_every": 0}
    ds = DatasetRef("synthetic_near", {"train_per_class": 10, "test_per_class": 2, "image_size": 16})
    base = run_trial(TrialSpec(MODEL, ds, "scratch", {"lr": 0.05, "wd": 0.0}, opts, key_rule=rule), ctx)
    longer = run_trial(TrialSpec(MODEL, ds, "scratch", {"lr": 0.05, "wd": 0.0, "schedule": 2.0}, opts,
                                 key_rule=rule), ctx)
    subset = run_trial(TrialSpec(MODEL, ds, "scratch", {"lr": 0.05, "wd": 0.0, "train_size": 2.0}, opts,
                                 key_rule=rule), ctx)
    assert [r.status for r in (base, longer, subset)] == ["finished"] * 3, [base.message, subset.message]
    assert (base.steps_done, longer.steps_done, subset.steps_done) == (3, 6, 3)
    assert seen == [80, 80, 20]  # 10 classes × 8 training images each (2 held out); the subset: 2 per class
    assert "train_subset" in subset.fingerprints and "train_subset" not in base.fingerprints
    bad = run_trial(TrialSpec(MODEL, ds, "scratch", {"lr": 0.05, "wd": 0.0, "train_size": 2.5}, opts,
                              key_rule=rule), ctx)
    assert bad.status == "failed" and "train_size must be an integer >= 0" in bad.message


def test_the_probe_fits_on_the_images_a_finetune_trial_of_its_seed_trains_on(tmp_path, monkeypatch):
    """train_size on the probe: the rows of the stored training features that fine-tune's subset of the
    same seed holds — same size, same images — and the full set at the default."""
    from xfer import logistic
    from xfer.contract import RunContext
    from xfer.data import build_from_ref
    from xfer.data.subset import class_balanced_subset
    from xfer.regimes import run_trial

    fitted: list[int] = []
    fit = logistic.fit_logistic

    def spy(x, y, *args, **kw):
        fitted.append(len(y))
        return fit(x, y, *args, **kw)

    monkeypatch.setattr(logistic, "fit_logistic", spy)
    ctx = RunContext.local(storage=tmp_path, data_root=tmp_path)
    ds = DatasetRef("synthetic_near", {"train_per_class": 10, "test_per_class": 2, "image_size": 16})
    opts = {"max_iter": 50}
    rule = REGIMES.get("linear_probe").key_rule
    full = run_trial(TrialSpec(MODEL, ds, "linear_probe", {"l2": 0.1}, opts, key_rule=rule), ctx)
    records = {seed: run_trial(TrialSpec(MODEL, ds, "linear_probe", {"l2": 0.1, "train_size": 3.0}, opts,
                                         key_rule=rule, seed=seed), ctx) for seed in (0, 1)}
    assert full.status == "finished" and all(r.status == "finished" for r in records.values())
    assert fitted == [80, 30, 30]
    built = build_from_ref(ds, data_root=tmp_path, download=False)
    for seed, record in records.items():  # the fine-tune subset's fingerprint hashes its chosen indices
        _, fingerprint = class_balanced_subset(built, "train", 3, seed=seed)
        assert record.fingerprints["train_subset"] == fingerprint
        assert record.metrics["train_examples"] == 30
    assert records[0].fingerprints["train_subset"] != records[1].fingerprints["train_subset"]
    assert "train_subset" not in full.fingerprints


# ------------------------------------------------------------------ curves back from MLflow
def test_curves_come_back_from_mlflow_into_the_report(tmp_path):
    from xfer import final, tracking
    from xfer.tracking import writer
    from xfer.tracking.writer import SweepTracker, TrackingCallback
    from xfer.contract import TrialRecord

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "curves")
    tracker.start_parent({"total": 4})
    cb = TrackingCallback(tracker)
    spec = parse_spec({"name": "curves", "models": [{"name": "m", "arch": "test_resnet", "weights": "random"}],
                       "datasets": ["digits"],
                       "regimes": {r: {"grid": {"lr": [0.1], "wd": [0], "schedule": [1, 2]}, "steps": 10,
                                       "eval_every": 5} for r in ("finetune", "scratch")}})
    grid = spec.grid_trials()
    for i, t in enumerate(grid):
        n = int(10 * t.hparams.get("schedule", 1.0))
        fast = t.regime == "finetune"
        vals = {s: (0.9 if fast else 0.5 + 0.3 * s / n) for s in range(5, n + 1, 5)}
        trial = SimpleNamespace(trial_id=f"g{i}", config={"trial": t.to_dict()}, error_file=None)
        cb.on_trial_start(iteration=0, trials=[], trial=trial)
        for s, v in vals.items():
            cb.on_trial_result(iteration=0, trials=[], trial=trial, result={"xfer_step": s, "val_top1": v})
        record = TrialRecord(status="finished", metric="top1", metrics={"val_top1": vals[n]}, steps_done=n)
        cb.on_trial_result(iteration=0, trials=[], trial=trial, result={
            "xfer_final": True, "xfer_step": n, "xfer_record": json.dumps(record.to_json())})
    sel = select_best(tracking.load_runs(uri, "curves"), trials=grid)
    for i, f in enumerate(final_trials(sel, grid)):
        trial = SimpleNamespace(trial_id=f"f{i}", config={"trial": f.to_dict()}, error_file=None)
        cb.on_trial_start(iteration=0, trials=[], trial=trial)
        test = (0.9 if f.regime == "finetune" else 0.6) + 0.05 * f.hparams.get("schedule", 1.0)
        record = TrialRecord(status="finished", metric="top1", metrics={"test_top1": test}, steps_done=10)
        cb.on_trial_result(iteration=0, trials=[], trial=trial, result={
            "xfer_final": True, "xfer_step": 10, "xfer_record": json.dumps(record.to_json())})

    results = final.results_from_mlflow(uri, "curves", grid)
    assert len(results) == 4 and (results.status == "finished").all()
    made = final.build(results, tmp_path / "report", uri=uri, title="curves", stream=io.StringIO())
    writer._ACTIVE_PARENTS.clear()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Convergence" in md and "## Schedule length" in md
    assert "fig_convergence" in made["files"]
    conv = md.split("## Convergence")[1].split("##")[0]
    # fine-tuning is at its final value from the first evaluation (step 5); scratch needs the last step
    assert "| digits | 1× | 5 | 10 |" in conv and "| digits | 2× | 5 | 20 |" in conv
