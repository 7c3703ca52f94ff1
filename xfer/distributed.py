"""Data-parallel source training: one pretrain trial on several workers (GPUs, nodes) with Ray Train.

ImageNet-scale source training does not fit one GPU per trial. A pretrain trial whose
``resources.pretrain`` asks for ``workers: N`` (> 1) stays **one** Tune trial, one MLflow run and one
checkpoint, but inside it a ``ray.train.torch.TorchTrainer`` starts N workers (each ``cpu``/``gpu`` of
the resources entry) with a torch process group (gloo on CPU, NCCL on GPU). Every worker runs the same
pretrain regime; ``xfer.engine`` sees the process group and trains data-parallel (each rank takes its
share of every global batch, gradients averaged, batch-norm statistics over the global batch), so
N workers × batch/N follow one worker × batch up to float rounding. Rank 0 evaluates, writes the
checkpoint and ``meta.json``, and leaves its trial record beside the trial's periodic checkpoints,
which is what the Tune trial reports. Per-step losses travel worker → Train → Tune (Ray's
``TuneReportCallback``) → the driver's tracking callback, as for any other trial.

The regime and the engine stay free of Ray: this module (orchestration layer) is the only place that
knows about Ray Train.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from xfer.contract import RunContext, TrialRecord
from xfer.io import write_text
from xfer.layout import StorageLayout
from xfer.plugins import import_plugins
from xfer.tracking import writer
from xfer.trial import TrialSpec

log = logging.getLogger(__name__)

RECORD_FILE = "distributed_record.json"  # rank 0's trial record, in the trial's work dir


@dataclass(frozen=True)
class Workers:
    """How one data-parallel trial is sized: ``count`` workers of ``cpu`` CPUs and ``gpu`` GPUs each."""

    count: int
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.count!r}")

    @staticmethod
    def from_resources(res: dict[str, float]) -> "Workers":
        return Workers(count=int(res.get("workers", 1)), cpu=float(res.get("cpu", 1.0)),
                       gpu=float(res.get("gpu", 0.0)))


def _worker_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the pretrain regime inside the process group Train set up."""
    import ray.train
    import ray.train.torch

    import_plugins(config["plugins"])
    from xfer.regimes import run_trial

    trial = TrialSpec.from_dict(config["trial"])
    layout = StorageLayout(Path(config["storage"]), Path(config["data_root"]))
    rank = ray.train.get_context().get_world_rank()

    def report(step: int, metrics: dict[str, float]) -> None:
        # every rank reports at the same steps (Train's report is a barrier); Tune keeps rank 0's
        ray.train.report({writer.STEP: int(step), **{k: float(v) for k, v in metrics.items()},
                          writer.OBJECTIVE: 0.0})

    device = str(ray.train.torch.get_device()) if config["gpu"] else "cpu"
    ctx = RunContext(layout=layout, download=config["download"], device=device,
                     work_dir=layout.work_dir(trial.key), report=report)
    record = run_trial(trial, ctx)
    if rank == 0:
        write_text(layout.work_dir(trial.key) / RECORD_FILE, json.dumps(record.to_json()))
    if record.status == "failed":  # Train's failure policy decides about a retry (from the checkpoint)
        raise RuntimeError(f"rank {rank}: {record.message}")


def run_data_parallel(trial: TrialSpec, layout: StorageLayout, workers: Workers, *, download: bool,
                      plugins: Sequence[str] = (), max_failures: int = 1) -> TrialRecord:
    """Run ``trial`` (a pretrain trial) on ``workers`` with Ray Train and return rank 0's record.
    Inside a Tune trial the workers' reports reach Tune; outside one (tests, scripts) they stay in Train."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    callbacks: list = []
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    record_file = layout.work_dir(trial.key) / RECORD_FILE
    record_file.unlink(missing_ok=True)
    resources = {"CPU": workers.cpu, **({"GPU": workers.gpu} if workers.gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"trial": trial.to_dict(), "storage": str(layout.storage), "data_root": str(layout.data_root),
                           "download": download, "plugins": list(plugins), "gpu": workers.gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=workers.count, use_gpu=workers.gpu > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"pretrain-{trial.key}", storage_path=str(layout.ray / "train"),
                                       callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - the trial fails (and is retried into its run), the sweep goes on
        log.error("data-parallel pretrain %s failed: %s", trial.key, e)
        return TrialRecord(status="failed", metric="top1", message=f"{type(e).__name__}: {e}")
    try:
        return TrialRecord.from_json(json.loads(record_file.read_text()))
    except (OSError, ValueError) as e:
        return TrialRecord(status="failed", metric="top1",
                           message=f"rank 0 left no trial record at {record_file}: {e}")


def runner_for(trial: TrialSpec, resources: dict[str, float], *, download: bool,
               plugins: Sequence[str] = ()) -> Callable[[TrialSpec, RunContext], TrialRecord] | None:
    """A trial runner that goes data-parallel when ``trial`` is a pretrain trial and ``resources`` ask
    for more than one worker; None (run in the Tune trial's own process) otherwise."""
    workers = Workers.from_resources(resources)
    if trial.regime != "pretrain" or workers.count == 1:
        return None

    def run(t: TrialSpec, ctx: RunContext) -> TrialRecord:
        return run_data_parallel(t, ctx.layout, workers, download=download, plugins=plugins)

    return run
