"""Best-on-validation selection, the final-stage trial list and the results table (xfer/select.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from xfer.select import expected_cells, selection_columns, final_trials, results_table, select_best
from xfer.trial import DatasetRef, ModelSpec, TrialSpec

MODELS = [ModelSpec(name="small", arch="test_resnet", weights="random", source_top1=0.6),
          ModelSpec(name="big", arch="test_convnext", weights="random", source_top1=0.7)]
DATASETS = [DatasetRef("digits"), DatasetRef("synthetic_near")]
FT_GRID = [{"lr": lr, "wd": wd} for lr in (0.001, 0.01, 0.1) for wd in (0.0, 1e-4)]
LP_GRID = [{"l2": l2} for l2 in (1e-3, 1e-1, 10.0)]


def grid(seeds=(0,)) -> list[TrialSpec]:
    out = []
    for seed in seeds:
        for m in MODELS:
            for d in DATASETS:
                for hp in FT_GRID:
                    out.append(TrialSpec(m, d, "finetune", hp, {"steps": 10}, seed=seed))
                for hp in LP_GRID:
                    out.append(TrialSpec(m, d, "linear_probe", hp, {}, seed=seed))
    return out


def runs_for(trials, val_fn, status_fn=lambda t: "finished", stage="grid", test_fn=None) -> pd.DataFrame:
    rows = []
    for i, t in enumerate(trials):
        status = status_fn(t)
        rows.append({"run_id": f"run{i:03d}-{stage}", "trial_key": t.key, "model": t.model.name,
                     "dataset": t.dataset.display, "regime": t.regime, "stage": stage, "status": status,
                     "metric": "top1", "val": val_fn(t) if status == "finished" else math.nan,
                     "test": test_fn(t) if test_fn else math.nan, "source_top1": t.model.source_top1,
                     "lr": t.hparams.get("lr", math.nan), "wd": t.hparams.get("wd", math.nan),
                     "l2": t.hparams.get("l2", math.nan), "seed": t.seed,
                     "start_time": pd.Timestamp(1_700_000_000_000 + 1000 * i, unit="ms", tz="UTC")})
    df = pd.DataFrame(rows, columns=["run_id", "trial_key", "model", "dataset", "regime", "stage", "status",
                                     "metric", "val", "test", "source_top1", "lr", "wd", "l2", "seed", "start_time"])
    df["seed"] = df["seed"].astype("Int64")  # as xfer.tracking.load_runs gives them
    return df


def hp_val(t: TrialSpec) -> float:
    """A smooth validation surface: best at lr=0.01, wd=1e-4 (finetune, scratch) and l2=0.1 (linear_probe)."""
    if t.regime in ("finetune", "scratch"):
        return 0.9 - 0.1 * abs(math.log10(t.hparams["lr"]) + 2) - (0.01 if t.hparams["wd"] == 0 else 0)
    return 0.8 - 0.05 * abs(math.log10(t.hparams["l2"]) + 1)


def cell(sel: pd.DataFrame, model: str, dataset: str, regime: str) -> pd.Series:
    rows = sel[(sel.model == model) & (sel.dataset == dataset) & (sel.regime == regime)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_best_on_validation_is_picked_per_cell():
    trials = grid()
    sel = select_best(runs_for(trials, hp_val))
    assert list(sel.columns) == selection_columns()
    assert len(sel) == len(MODELS) * len(DATASETS) * 2
    assert (sel.status == "selected").all()
    for _, row in sel[sel.regime == "finetune"].iterrows():
        assert (row.lr, row.wd) == (0.01, 1e-4) and math.isnan(row.l2)
        assert row.val == pytest.approx(0.9)
        assert row.n_trials == len(FT_GRID) == row.n_finished
    for _, row in sel[sel.regime == "linear_probe"].iterrows():
        assert row.l2 == 0.1 and math.isnan(row.lr)
    # run_id / trial_key name the chosen trial
    by_key = {t.key: t for t in trials}
    for _, row in sel.iterrows():
        t = by_key[row.trial_key]
        assert t.cell == (row.model, row.dataset, row.regime)
        assert dict(t.hparams).get("lr", math.nan) == pytest.approx(row.lr, nan_ok=True)


def test_tie_break_is_deterministic_and_documented_order():
    trials = grid()
    flat = select_best(runs_for(trials, lambda t: 0.5))  # every configuration ties on val
    for _, row in flat.iterrows():
        if row.regime == "finetune":
            assert (row.lr, row.wd) == (0.001, 0.0)  # smaller lr, then smaller wd
        else:
            assert row.l2 == 10.0  # larger l2 (stronger regularisation)
    # ties only on wd at the best lr: smaller wd wins
    sel = select_best(runs_for(trials, lambda t: 0.7 if t.hparams.get("lr") == 0.1 else 0.6))
    assert set(sel[sel.regime == "finetune"].wd) == {0.0}
    # the row order of the runs table does not matter
    runs = runs_for(trials, lambda t: 0.5)
    for seed in range(3):
        shuffled = runs.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        pd.testing.assert_frame_equal(select_best(shuffled), flat)


def test_accuracy_ties_survive_float_noise():
    trials = grid()
    # 0.1 + 0.2 != 0.3 in floats; a tie in accuracy must still go to the tie-break (smaller lr)
    sel = select_best(runs_for(trials, lambda t: (0.1 + 0.2) if t.hparams.get("lr") == 0.1 else 0.3))
    assert set(sel[sel.regime == "finetune"].lr) == {0.001}


def test_diverged_and_failed_runs_are_never_selected():
    trials = grid()

    def status(t):
        if t.regime == "finetune" and t.hparams["lr"] == 0.01:
            return "diverged" if t.hparams["wd"] == 0 else "failed"
        return "finished"

    runs = runs_for(trials, hp_val, status)
    runs.loc[runs.status != "finished", "val"] = 0.99  # a diverged run with a (bogus) high val
    sel = select_best(runs)
    ft = sel[sel.regime == "finetune"]
    assert (ft.lr != 0.01).all()
    assert (ft.n_trials == len(FT_GRID)).all() and (ft.n_finished == len(FT_GRID) - 2).all()


def test_missing_cells_are_kept_not_dropped(caplog):
    trials = grid()
    status = lambda t: "diverged" if (t.model.name, t.dataset.name, t.regime) == ("big", "digits", "finetune") \
        else "finished"
    # a cell with no runs at all: drop every run of small / synthetic_near / linear_probe
    runs = runs_for(trials, hp_val, status)
    runs = runs[~((runs.model == "small") & (runs.dataset == "synthetic_near") & (runs.regime == "linear_probe"))]
    sel = select_best(runs, trials=trials)
    assert len(sel) == len(expected_cells(trials)) == 8
    assert [tuple(r) for r in sel[["model", "dataset", "regime"]].itertuples(index=False)] == expected_cells(trials)
    diverged = cell(sel, "big", "digits", "finetune")
    assert diverged.status == "missing" and pd.isna(diverged.run_id) and math.isnan(diverged.val)
    assert diverged.n_trials == len(FT_GRID) and diverged.n_finished == 0
    absent = cell(sel, "small", "synthetic_near", "linear_probe")
    assert absent.status == "missing" and absent.n_trials == 0
    assert "big / digits / finetune" in caplog.text
    # without trials= the absent cell cannot be known, the diverged one still is reported
    assert len(select_best(runs)) == 7


def test_runs_outside_the_grid_are_ignored_when_trials_given():
    trials = grid()
    runs = runs_for(trials, hp_val)
    old = TrialSpec(MODELS[0], DATASETS[0], "finetune", {"lr": 0.05, "wd": 0.0}, {"steps": 10})
    stale = runs_for([old], lambda t: 0.999)
    stale["run_id"] = "stale"
    sel_all = select_best(pd.concat([runs, stale], ignore_index=True))
    assert cell(sel_all, "small", "digits", "finetune").run_id == "stale"
    sel = select_best(pd.concat([runs, stale], ignore_index=True), trials=trials)
    assert cell(sel, "small", "digits", "finetune").lr == 0.01


def test_only_the_requested_stage_is_used():
    trials = grid()
    runs = pd.concat([runs_for(trials, hp_val),
                      runs_for([t for t in trials if t.hparams.get("lr") == 0.1], lambda t: 0.99, stage="final")],
                     ignore_index=True)
    assert set(select_best(runs).lr.dropna()) == {0.01}


def test_seeds_are_averaged_per_configuration():
    trials = grid(seeds=(0, 1))
    # seed 0 prefers lr=0.1 slightly, seed 1 prefers lr=0.01 strongly: the mean picks lr=0.01
    def val(t):
        if t.regime != "finetune":
            return 0.5
        table = {(0, 0.1): 0.80, (0, 0.01): 0.79, (1, 0.1): 0.60, (1, 0.01): 0.78}
        return table.get((t.seed, t.hparams["lr"]), 0.1)

    sel = select_best(runs_for(trials, val))
    row = cell(sel, "small", "digits", "finetune")
    assert row.lr == 0.01 and row.val == pytest.approx((0.79 + 0.78) / 2)
    by_key = {t.key: t for t in trials}
    assert by_key[row.trial_key].seed == 0  # named by its smallest seed
    finals = final_trials(sel, trials)
    cell_finals = [t for t in finals if t.cell == ("small", "digits", "finetune")]
    assert sorted(t.seed for t in cell_finals) == [0, 1]


def test_final_trials_are_the_selected_configs_with_stage_final():
    trials = grid()
    runs = runs_for(trials, hp_val, lambda t: "failed" if t.model.name == "big" and t.regime == "linear_probe"
                    else "finished")
    sel = select_best(runs, trials=trials)
    finals = final_trials(sel, trials)
    assert len(finals) == (sel.status == "selected").sum() == 6
    assert all(t.stage == "final" for t in finals)
    by_key = {t.key: t for t in trials}
    for f, (_, row) in zip(finals, sel[sel.status == "selected"].iterrows()):
        g = by_key[row.trial_key]
        assert (f.model, f.dataset, f.regime, dict(f.hparams), dict(f.options), f.seed) == \
            (g.model, g.dataset, g.regime, dict(g.hparams), dict(g.options), g.seed)
        assert f.key != g.key  # the stage is part of the key: final runs are new runs
    # stable order: the grid's order, whatever the selection's row order
    again = final_trials(sel.iloc[::-1].reset_index(drop=True), trials)
    assert [t.key for t in again] == [t.key for t in finals]


def test_final_trials_refuses_a_selection_from_another_grid():
    trials = grid()
    sel = select_best(runs_for(trials, hp_val))
    with pytest.raises(ValueError, match="not in the sweep's grid"):
        final_trials(sel, [t for t in trials if t.hparams.get("lr") != 0.01])


def test_results_table_uses_the_final_runs_test_metric():
    trials = grid()
    sel = select_best(runs_for(trials, hp_val, lambda t: "diverged" if t.model.name == "big"
                               and t.dataset.name == "digits" and t.regime == "finetune" else "finished"))
    finals = final_trials(sel, trials)
    test_of = {f.key: 0.5 + 0.01 * i for i, f in enumerate(finals)}
    final_runs = runs_for(finals, lambda t: math.nan, stage="final", test_fn=lambda t: test_of[t.key])
    # a stale final run of another configuration in one cell must be ignored
    stale_t = TrialSpec(MODELS[0], DATASETS[0], "finetune", {"lr": 0.1, "wd": 0.0}, {"steps": 10}, stage="final")
    stale = runs_for([stale_t], lambda t: math.nan, stage="final", test_fn=lambda t: 0.01)
    stale["run_id"] = "stale"
    # the final run of one cell failed
    lp = next(f for f in finals if f.cell == ("small", "synthetic_near", "linear_probe"))
    final_runs.loc[final_runs.trial_key == lp.key, ["status", "test"]] = ["failed", math.nan]
    res = results_table(pd.concat([final_runs, stale], ignore_index=True), sel)
    assert len(res) == len(sel)
    assert list(res.columns[:6]) == ["model", "dataset", "regime", "source_top1", "metric", "value"]
    for f in finals:
        row = cell(res, *f.cell)
        if f.key == lp.key:
            assert row.status == "no_final" and math.isnan(row.value) and "failed" in row.note
        else:
            assert row.status == "finished" and row.value == pytest.approx(test_of[f.key])
            assert row.run_id != "stale" and row.source_top1 == f.model.source_top1 and row.metric == "top1"
    missing = cell(res, "big", "digits", "finetune")
    assert missing.status == "no_selection" and math.isnan(missing.value)


def test_bad_runs_table_says_what_is_missing():
    with pytest.raises(ValueError, match=r"lacks column\(s\) status, val.*found: run_id"):
        select_best(pd.DataFrame({"run_id": ["a"], "trial_key": ["k"], "model": ["m"], "dataset": ["d"],
                                  "regime": ["finetune"], "stage": ["grid"]}))
    with pytest.raises(TypeError, match="DataFrame"):
        select_best([{"run_id": "a"}])


def test_empty_runs_table_gives_all_cells_missing():
    trials = grid()
    empty = pd.DataFrame(columns=["run_id", "trial_key", "model", "dataset", "regime", "stage", "status", "val"])
    sel = select_best(empty, trials=trials)
    assert len(sel) == 8 and (sel.status == "missing").all() and (sel.n_trials == 0).all()
    assert final_trials(sel, trials) == []
    assert np.isnan(results_table(empty.assign(test=[]), sel).value).all()


def test_results_table_feeds_the_report_statistics():
    from xfer import stats
    from xfer.report import validate_results

    trials = grid()
    sel = select_best(runs_for(trials, hp_val), trials=trials)
    finals = final_trials(sel, trials)
    test_of = {f.key: (0.6 if f.model.name == "small" else 0.8) - (0.1 if f.dataset.name == "digits" else 0)
               for f in finals}
    res = results_table(runs_for(finals, lambda t: math.nan, stage="final", test_fn=lambda t: test_of[t.key]), sel)
    checked = validate_results(res)
    head = stats.headline(checked, n_boot=0)
    assert set(head) == {"finetune", "linear_probe"}
    assert head["finetune"]["n_models"] == 2 and head["finetune"]["n_datasets"] == 2


def test_a_rerun_logged_twice_counts_once_latest_wins():
    trials = grid()
    runs = runs_for(trials, hp_val)
    best = runs[(runs.model == "small") & (runs.dataset == "digits") & (runs.regime == "finetune")
                & (runs.lr == 0.01) & (runs.wd == 1e-4)].iloc[0]
    older = best.copy()
    older["run_id"], older["val"] = "older", 0.99
    older["start_time"] = best["start_time"] - pd.Timedelta(hours=1)
    unknown_time = best.copy()
    unknown_time["run_id"], unknown_time["val"], unknown_time["start_time"] = "no-time", 0.99, pd.NaT
    sel = select_best(pd.concat([runs, older.to_frame().T, unknown_time.to_frame().T], ignore_index=True))
    row = cell(sel, "small", "digits", "finetune")
    assert row.run_id == best.run_id and row.val == pytest.approx(0.9)


# ------------------------------------------------------------------ what selection refuses to guess
def test_runs_differing_only_in_what_the_table_cannot_show_are_refused():
    """Two trials of one cell at the same grid point and seed (here: other options) are not averaged."""
    from xfer.select import SelectionError

    a = TrialSpec(MODELS[0], DATASETS[0], "finetune", {"lr": 0.01, "wd": 0.0}, {"steps": 10})
    b = TrialSpec(MODELS[0], DATASETS[0], "finetune", {"lr": 0.01, "wd": 0.0}, {"steps": 20})
    runs = runs_for([a, b], lambda t: 0.5)
    with pytest.raises(SelectionError, match=r"small / digits / finetune: runs .* same grid point .* different trials"):
        select_best(runs)
    # with the sweep's grid, only its own trial counts: nothing is ambiguous
    assert select_best(runs, trials=[a])["trial_key"].tolist() == [a.key]


def test_a_regime_selection_does_not_know_is_refused():
    from xfer.select import SelectionError

    runs = runs_for(grid()[:2], lambda t: 0.5).assign(regime="from_a_plugin_not_loaded")
    with pytest.raises(SelectionError, match="'from_a_plugin_not_loaded': no such regime is registered"):
        select_best(runs)


def test_cells_sharing_a_trial_each_get_the_selection_and_the_final_run():
    """A scratch trial does not depend on the model entry's weights: two entries of one architecture
    share its key; each cell is selected and each has a final trial (one run serves both)."""
    from xfer.regimes import REGIMES

    rule = REGIMES.get("scratch").key_rule
    m1 = ModelSpec(name="hub-a", arch="test_resnet", weights="hub")
    m2 = ModelSpec(name="file-b", arch="test_resnet", weights="random")
    trials = [TrialSpec(m, DATASETS[0], "scratch", hp, {"steps": 10}, key_rule=rule) for m in (m1, m2) for hp in FT_GRID]
    assert len({t.key for t in trials}) == len(FT_GRID)
    sel = select_best(runs_for(trials, hp_val), trials=trials)
    assert sel["model"].tolist() == ["hub-a", "file-b"] and (sel["status"] == "selected").all()
    assert sel["trial_key"].nunique() == 1
    finals = final_trials(sel, trials)
    assert [f.model.name for f in finals] == ["hub-a", "file-b"] and len({f.key for f in finals}) == 1


def test_model_facts_and_solver_status_reach_the_results_table():
    from dataclasses import replace as _replace

    from xfer.trial import DatasetRef, ModelSpec

    stand = ModelSpec(name="v1", arch="inception_v3.tv_in1k", paper_name="Inception v1", input_size=256)
    real = ModelSpec(name="r50", arch="resnet50.tv_in1k", paper_name="ResNet-50")
    trials = [TrialSpec(model=m, dataset=DatasetRef("digits"), regime="linear_probe", hparams={"l2": l2},
                        options={}) for m in (stand, real) for l2 in (0.1, 1.0)]
    runs = runs_for(trials, hp_val).assign(solver_converged=[1.0, 0.0, 1.0, 1.0])
    sel = select_best(runs, trials=trials)
    by = sel.set_index("model")
    assert bool(by.loc["v1", "stand_in"]) and not bool(by.loc["r50", "stand_in"])  # from the shipped table
    assert (by.loc["v1", "input_size"], by.loc["v1", "source_input_size"]) == (256, 299)
    assert (by.loc["r50", "input_size"], by.loc["r50", "source_input_size"]) == (224, 224)
    assert by.loc["v1", "n_unconverged"] == 1 and by.loc["r50", "n_unconverged"] == 0
    finals = [_replace(t, stage="final") for t in final_trials(sel, trials)]
    fr = runs_for(finals, lambda t: math.nan, stage="final", test_fn=lambda t: 0.8).assign(solver_converged=[0.0, 1.0])
    res = results_table(fr, sel).set_index("model")
    assert res.loc["v1", "paper_name"] == "Inception v1" and bool(res.loc["v1", "stand_in"])
    assert res.loc["v1", "solver_converged"] == 0.0 and res.loc["v1", "n_grid_unconverged"] == 1
    assert res.loc["r50", "solver_converged"] == 1.0
