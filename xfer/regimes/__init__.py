"""Regimes: one module each, one descriptor class (``base.Regime``), one registry (``REGIMES``).

A new regime is one module that subclasses ``Regime`` and adds an instance to ``REGIMES``, plus its
import line below; nothing else in xfer names regimes.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import TYPE_CHECKING

from xfer.contract import Diverged, RunContext, TrialRecord
from xfer.options import OptionError
from xfer.regimes.base import REGIMES, Axis, Option, Regime
from xfer.regimes import finetune, linear_probe, pretrain  # noqa: E402,F401  (they register themselves)

if TYPE_CHECKING:
    from xfer.trial import TrialSpec

log = logging.getLogger(__name__)

__all__ = ["REGIMES", "Axis", "Option", "Regime", "all_axis_names", "run_trial", "run_trials"]


def all_axis_names() -> list[str]:
    """Every grid axis a registered regime declares, sorted: the runs and results tables' hyper-parameter
    columns, and the `xfer trial` flags."""
    return sorted({a.name for name in REGIMES.names() for a in REGIMES.get(name).axes})


def run_trial(trial: "TrialSpec", ctx: RunContext) -> TrialRecord:
    """Run one trial; never raises for a bad trial. A non-finite loss → ``diverged``, any other
    error → ``failed`` with the message (the sweep goes on; the tracking run records why). The
    record's ``seconds`` is the trial's own wall time. CPU trials run with ``ctx.threads`` torch threads."""
    from xfer.engine import pinned_threads

    t0 = time.perf_counter()
    try:
        regime = REGIMES.get(trial.regime)
        with pinned_threads(ctx):  # same spec + seed + machine -> same metrics, whatever the environment
            record = regime.run(trial, ctx)
    except Diverged as e:
        record = TrialRecord(status="diverged", message=str(e))
    except KeyboardInterrupt:
        raise
    except (FileNotFoundError, OptionError) as e:  # bad data or a bad option: the message says what to do
        log.error("trial %s failed: %s", trial.key, e)
        log.debug("%s", traceback.format_exc())
        record = TrialRecord(status="failed", message=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a trial's failure must not end the sweep
        log.error("trial %s failed: %s\n%s", trial.key, e, traceback.format_exc())
        record = TrialRecord(status="failed", message=f"{type(e).__name__}: {e}")
    record.seconds = time.perf_counter() - t0
    return record


def run_trials(trials: "list[TrialSpec]", ctx: RunContext) -> list[TrialRecord]:
    """Several trials of one path group (see ``Regime.path_group``): solved together by the regime's
    ``run_path`` when there are several, else one by one. One record per trial, in order; never raises
    for a bad trial (if the path fails, each trial runs on its own so that one bad point costs one run).
    Each record's ``seconds`` is its share of the batch's wall time."""
    from xfer.engine import pinned_threads

    regime = REGIMES.get(trials[0].regime)
    if len(trials) < 2 or regime.path_axis is None:
        return [run_trial(t, ctx) for t in trials]
    t0 = time.perf_counter()
    try:
        with pinned_threads(ctx):
            records = regime.run_path(list(trials), ctx)
    except Diverged as e:
        records = [TrialRecord(status="diverged", message=str(e)) for _ in trials]
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - fall back to one trial at a time
        log.error("path of %d %s trials failed (%s: %s); running them one by one", len(trials), regime.name,
                  type(e).__name__, e)
        return [run_trial(t, ctx) for t in trials]
    share = (time.perf_counter() - t0) / len(trials)
    for r in records:
        r.seconds = share
    return records
