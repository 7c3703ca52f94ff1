"""Regimes: one module each, one interface (``base.Regime``), one registry (``REGIMES``)."""
from __future__ import annotations

import logging
import traceback

from xfer.regimes.base import REGIMES, Diverged, Regime, RunContext, TrialResult, splits_for
from xfer.regimes import finetune, linear_probe, pretrain  # noqa: F401  (they register themselves)

log = logging.getLogger(__name__)

__all__ = ["REGIMES", "Diverged", "Regime", "RunContext", "TrialResult", "splits_for", "run_trial"]


def run_trial(trial, ctx: RunContext) -> TrialResult:
    """Run one trial; never raises for a bad trial. A non-finite loss → ``diverged``, any other
    error → ``failed`` with the message (the sweep goes on; the tracking run records why)."""
    regime = REGIMES.get(trial.regime)
    try:
        return regime.run(trial, ctx)
    except Diverged as e:
        return TrialResult(status="diverged", message=str(e))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a trial's failure must not end the sweep
        log.error("trial %s failed: %s\n%s", trial.key, e, traceback.format_exc())
        return TrialResult(status="failed", message=f"{type(e).__name__}: {e}")
