"""A readable live view of a sweep stage, replacing Ray Tune's table output.

One line per finished trial, a status line at most every ``interval_s`` seconds while trials run,
and the best-so-far per (model, dataset, regime) at the end of the stage.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from ray.tune import Callback

from xfer.tracking.writer import FINAL, STEP, VAL, final_entries
from xfer.trial import TrialSpec


def _fmt_hparams(h: dict[str, float], regime: str) -> str:
    """``l2=0.001 pool=max``: each value as its regime's axis prints it (a named axis by its name)."""
    from xfer.regimes import REGIMES

    axes = {a.name: a for a in REGIMES.get(regime).axes} if regime in REGIMES else {}
    return " ".join(axes[k].format(v) if k in axes else f"{k}={v:.3g}" for k, v in h.items())


def _record(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(status, metrics + message) of a final entry (``xfer.tracking.writer.final_entries``)."""
    rec = json.loads(entry["record"])
    return rec.get("status", "failed"), {**rec.get("metrics", {}), "message": rec.get("message", "")}


@dataclass
class StageProgress:
    """Pure bookkeeping (no Ray): counts and best-so-far, so the view is testable on its own."""

    stage: str
    total: int
    done: int = 0
    failed: int = 0
    diverged: int = 0
    stopped: int = 0  # ended early by a scheduler (ASHA): no result
    running: set[str] = field(default_factory=set)
    best: dict[tuple[str, str, str], tuple[float, str, str]] = field(default_factory=dict)

    def start(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def finish(self, trial_id: str, cfg: dict[str, Any], status: str, metrics: dict[str, Any]) -> str:
        """Count one finished trial (a batch's trials one by one) and return its line."""
        self.running.discard(trial_id)
        self.done += 1
        if status == "failed":
            self.failed += 1
        elif status == "diverged":
            self.diverged += 1
        elif status == "stopped":
            self.stopped += 1
        cell = (cfg["model"]["name"], cfg["dataset"].get("label") or cfg["dataset"]["name"], cfg["regime"])
        name, value = _headline(metrics, cfg.get("stage", "grid"))
        if status == "finished" and value is not None:
            if cell not in self.best or value > self.best[cell][0]:
                self.best[cell] = (value, name, _fmt_hparams(cfg["hparams"], cfg["regime"]))
        result = f"{name} {value:.3f}" if value is not None else status
        if status != "finished":
            result = f"{status.upper()}" + (f" ({metrics.get('message', '')[:80]})" if metrics.get("message") else "")
        hp = _fmt_hparams(cfg["hparams"], cfg["regime"])
        return f"[{self.stage} {self.done}/{self.total}] {'/'.join(cell)} {hp} → {result}"

    def status_line(self) -> str:
        return (f"[{self.stage}] {self.done}/{self.total} done · {len(self.running)} running · "
                f"{self.failed} failed · {self.diverged} diverged" + (f" · {self.stopped} stopped" if self.stopped else ""))

    def best_table(self) -> list[str]:
        rows = [f"best so far ({self.stage}):"]
        for cell in sorted(self.best):
            value, name, hp = self.best[cell]
            rows.append(f"  {'/'.join(cell):<50} {name} {value:.3f}  ({hp})")
        return rows


def _headline(metrics: dict[str, Any], stage: str) -> tuple[str, float | None]:
    """The number a person wants to see for a trial of this stage."""
    prefixes = {"grid": ("val_",), "final": ("test_",), "pretrain": ("source_top1",)}.get(stage, ("val_", "test_"))
    for prefix in prefixes:
        for k, v in metrics.items():
            if k.startswith(prefix) and isinstance(v, (int, float)):
                return k, float(v)
    return "", None


def _trial_dict(trial) -> dict[str, Any]:
    return TrialSpec.from_config(trial.config).to_dict()


class ProgressCallback(Callback):
    """Prints StageProgress lines from the Tune driver."""

    def __init__(self, stage: str, total: int, stream: IO[str] | None = None, interval_s: float = 30.0,
                 quiet: bool = False) -> None:
        self.progress = StageProgress(stage, total)
        self.stream = stream
        self.interval_s = interval_s
        self.quiet = quiet
        self._last = time.monotonic()
        self._finished: set[str] = set()

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.start(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FINAL) and trial.trial_id not in self._finished:
            self._finished.add(trial.trial_id)
            for entry in final_entries(trial.config, result):
                status, metrics = _record(entry)
                self._print(self.progress.finish(trial.trial_id, entry["trial"], status, metrics))

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id not in self._finished:
            self._finished.add(trial.trial_id)
            err = str(trial.error_file or "worker error")
            self._print(self.progress.finish(trial.trial_id, _trial_dict(trial), "failed", {"message": err}))

    def on_trial_complete(self, iteration, trials, trial, **info):
        """Completed without its final result: a scheduler (ASHA) stopped it."""
        if trial.trial_id not in self._finished:
            self._finished.add(trial.trial_id)
            last = trial.last_result or {}
            message = f"at step {last.get(STEP, '?')}" + (f", validation {last[VAL]:.3f}" if VAL in last else "")
            self._print(self.progress.finish(trial.trial_id, _trial_dict(trial), "stopped", {"message": message}))

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last >= self.interval_s and self.progress.running:
            self._last = now
            self._print(self.progress.status_line())

    def on_experiment_end(self, trials, **info):
        self._print(self.progress.status_line())
        if self.progress.best:
            for line in self.progress.best_table():
                self._print(line)
