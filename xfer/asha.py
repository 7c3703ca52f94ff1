"""ASHA early stopping for the grid (``search: {type: asha, grace_steps, reduction_factor, audit}``).

Asynchronous successive halving (Li et al. 2020; Ray Tune's ``ASHAScheduler``) on the validation
metric that the step-trained regimes (``Regime.early_stopping``: fine-tune, scratch) report every
``eval_every`` steps of a grid trial: at rungs ``grace_steps × reduction_factor^k`` a trial goes on only
if its validation is in the top ``1/reduction_factor`` of what that rung has seen so far. Decisions are
per cell and seed (model, dataset, regime, cell point, seed — the unit selection picks a configuration
for): a poor lr on one dataset is never judged against another dataset's accuracies, and all cells
still run as one Tune experiment (``CellASHA`` keeps one ``ASHAScheduler`` per cell), so concurrency
across cells is kept.

A stopped trial is recorded as ``stopped`` (MLflow KILLED, ``xfer.asha_stopped_step``): never a result,
never selected, and a rerun leaves ASHA's decision alone. With ``audit: true`` the stopped trials are then
run to the end (a plain grid pass: they are not finished, so it runs them, into the same MLflow run,
where the tag stays), so every audited cell has both picks — ASHA's (best among the trials it let finish)
and the full grid's — and the final stage tests both (``xfer.report_asha`` compares them). Other regimes
(the probe's λ path) run their full grid as usual. Each grid trial is its own Ray trial (no
``trials_per_task``), and ``--resume`` is a rerun (the scheduler's state is not restored).
``xfer.sweep`` runs the passes (``SEARCHES["asha"]``); this module is the scheduler.
"""
from __future__ import annotations

from typing import Any, Sequence

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from xfer.regimes import REGIMES
from xfer.trial import TrialSpec
from xfer.tracking import writer


def cell_key(trial: TrialSpec) -> tuple:
    """What ASHA compares a trial within: its selection cell and seed."""
    from xfer.select import cell_of

    return (*cell_of(trial), trial.seed)


class CellASHA(FIFOScheduler):
    """One ``ASHAScheduler`` per cell (``cell_key``), time = the training step (``xfer_step``), metric =
    the validation reported during training (``xfer_val``, mode max), ``max_t`` = the cell's training
    steps (``Regime.budget``). ``stopped``: trial key → (step, validation) of every trial it stopped
    (``writer.EarlyStops``: the tracking callback records them as ``stopped``)."""

    def __init__(self, grace_steps: int, reduction_factor: float = 3) -> None:
        super().__init__()
        self.grace_steps = int(grace_steps)
        self.reduction_factor = float(reduction_factor)
        self.stopped: dict[str, tuple[int, float]] = {}
        self._cells: dict[tuple, ASHAScheduler] = {}
        self._by_trial: dict[str, tuple[ASHAScheduler, str]] = {}  # Ray trial id -> (its cell's ASHA, trial key)

    def _asha(self, trial: TrialSpec) -> ASHAScheduler:
        cell = cell_key(trial)
        if cell not in self._cells:
            budget = REGIMES.get(trial.regime).budget(trial)
            # stop_last_trials=False: reaching max_t is not a reason to stop (the final result must come)
            self._cells[cell] = ASHAScheduler(time_attr=writer.STEP, metric=writer.VAL, mode="max",
                                              max_t=max(budget, self.grace_steps), grace_period=self.grace_steps,
                                              reduction_factor=self.reduction_factor, stop_last_trials=False)
        return self._cells[cell]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        spec = TrialSpec.from_config(trial.config)
        asha = self._asha(spec)
        self._by_trial[trial.trial_id] = (asha, spec.key)
        asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        asha, key = self._by_trial[trial.trial_id]
        action = asha.on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and not result.get(writer.FINAL):
            self.stopped[key] = (int(result[writer.STEP]), float(result[writer.VAL]))
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if trial.trial_id in self._by_trial:
            self._by_trial.pop(trial.trial_id)[0].on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if trial.trial_id in self._by_trial:
            self._by_trial.pop(trial.trial_id)[0].on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"CellASHA: {len(self.stopped)} stopped over {len(self._cells)} cells"


def stoppable(trials: Sequence[TrialSpec]) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(trials of early-stopping regimes, the others)."""
    ours = [t for t in trials if REGIMES.get(t.regime).early_stopping]
    return ours, [t for t in trials if not REGIMES.get(t.regime).early_stopping]
