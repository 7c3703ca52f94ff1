"""`xfer sweep`: Ray Tune wiring for the study's stages.

    pretrain (source training, once per model) → features (once per key) → grid → final → report

The trainable is a thin adapter: it rebuilds the TrialSpec from the Ray config, calls
``regimes.run_trial`` and reports what it returns. MLflow is written only by the driver-side
``TrackingCallback`` (one writer; SQLite cannot take concurrent writers). Regimes know nothing of Ray.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

import numpy as np

from xfer.contract import RESULT_STATUSES, Reporter, RunContext, TrialRecord
from xfer.io import save_npz
from xfer.layout import StorageLayout
from xfer.plugins import import_plugins
from xfer.spec import SweepSpec, load_spec
from xfer.tracking import writer
from xfer.trial import ModelSpec, TrialSpec

log = logging.getLogger(__name__)

SHARED = "shared_models"  # in a Ray config's trial dict: other model entries with the same trial key


def _source_top1(model: ModelSpec, ctx: RunContext) -> float | None:
    from xfer.models import source_top1

    try:
        return source_top1(model, ctx)
    except Exception as e:  # noqa: BLE001 - a missing table entry must not fail a finished trial
        log.warning("no source accuracy for %s: %s", model.name, e)
        return None


def _entry(trial: TrialSpec, record: TrialRecord, ctx: RunContext, shared: Sequence[ModelSpec]) -> dict[str, Any]:
    """A finished trial's result as the callbacks read it: final-stage predictions saved, the model's
    source accuracy added, and the source accuracy of every model entry that shares the trial."""
    layout = ctx.layout
    if trial.stage == "final" and record.scores is not None and record.targets is not None:
        pred = layout.predictions(trial.key)
        save_npz(pred, scores=np.asarray(record.scores), targets=np.asarray(record.targets))
        record.artifacts["predictions"] = str(pred)
    if "source_top1" not in record.metrics and record.status == "finished":
        value = _source_top1(trial.model, ctx)
        if value is not None:
            record.metrics["source_top1"] = float(value)
    models = None
    if shared:
        found = {trial.model.name: record.metrics.get("source_top1")}
        found.update({m.name: _source_top1(m, ctx) for m in shared})
        models = json.dumps(found)
    return {"trial": trial.to_dict(), "record": json.dumps(record.to_json()), "models": models,
            "step": int(record.steps_done)}


def execute_trial(trial: TrialSpec, layout: StorageLayout, *, download: bool, report: Reporter,
                  shared: Sequence[ModelSpec] = (),
                  runner: Callable[[TrialSpec, RunContext], TrialRecord] | None = None) -> dict[str, Any]:
    """Run one trial and turn its record into the final result the callbacks read. ``shared``: other
    model entries whose trial is this same key (their source accuracies are recorded with it).
    ``runner``: how to run it (default ``regimes.run_trial`` in this process; a data-parallel pretrain
    trial passes ``xfer.distributed``'s). Plain Python (no Ray), so the adapter's behaviour is testable
    without a cluster."""
    from xfer.regimes import run_trial

    ctx = RunContext(layout=layout, download=download, work_dir=layout.work_dir(trial.key), report=report)
    record = (runner or run_trial)(trial, ctx)
    entry = _entry(trial, record, ctx, shared)
    result: dict[str, Any] = {writer.FINAL: True, writer.STEP: entry["step"], writer.RECORD: entry["record"],
                              # a diverged or failed trial is a searcher's worst outcome
                              writer.OBJECTIVE: record.objective() or 0.0}
    if entry["models"]:
        result[writer.MODELS] = entry["models"]
    return result


def execute_batch(jobs: Sequence[tuple[TrialSpec, Sequence[ModelSpec]]], layout: StorageLayout, *,
                  download: bool) -> dict[str, Any]:
    """Run a batch in one task: a path group (``Regime.path_group``), solved together by the regime
    (``run_trials``), or a few cheap trials of one cell, back to back (each in its own work folder);
    each trial keeps its own result entry, key and MLflow run."""
    from xfer.regimes import REGIMES, run_trial, run_trials

    trials = [t for t, _ in jobs]
    if REGIMES.get(trials[0].regime).path_axis is None:
        contexts = [RunContext(layout=layout, download=download, work_dir=layout.work_dir(t.key)) for t in trials]
        records = [run_trial(t, c) for t, c in zip(trials, contexts)]
        ctx = contexts[0]
    else:
        ctx = RunContext(layout=layout, download=download, work_dir=layout.work_dir(trials[0].key))
        records = run_trials(trials, ctx)
    entries = [_entry(t, r, ctx, shared) for (t, shared), r in zip(jobs, records)]
    best = max((r.objective() or 0.0 for r in records), default=0.0)
    return {writer.FINAL: True, writer.STEP: 0, writer.BATCH: json.dumps(entries), writer.OBJECTIVE: best}


def _trainable(config: dict[str, Any], *, storage: str, data_root: str, download: bool,
               plugins: Sequence[str] = (), pretrain_resources: Mapping[str, float] | None = None) -> None:
    """The Ray Tune function trainable (thin: everything happens in execute_trial / execute_batch).
    ``pretrain_resources`` with ``workers`` > 1: pretrain trials run data-parallel (``xfer.distributed``)."""
    from ray import tune

    from xfer import distributed

    import_plugins(plugins)  # (torch's thread count is pinned per trial by run_trial)
    layout = StorageLayout(Path(storage), Path(data_root))
    if writer.is_batch(config):
        jobs = [(TrialSpec.from_dict(d), [ModelSpec.from_dict(m) for m in d.get(SHARED, [])])
                for d in config["trial"][writer.BATCH]]
        tune.report(execute_batch(jobs, layout, download=download))
        return
    trial = TrialSpec.from_config(config)
    shared = [ModelSpec.from_dict(m) for m in config["trial"].get(SHARED, [])]
    latest = {writer.OBJECTIVE: 0.0}  # searchers read an objective from every report, not just the last

    def report(step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        val = {writer.VAL: v for k, v in values.items() if k.startswith("val_")}  # only where validation is
        latest.update({writer.OBJECTIVE: v for v in val.values()})
        tune.report({writer.STEP: int(step), **values, **latest, **val})

    runner = distributed.runner_for(trial, dict(pretrain_resources or {}), download=download, plugins=plugins)
    tune.report(execute_trial(trial, layout, download=download, report=report, shared=shared, runner=runner))


def trial_configs(trials: Sequence[TrialSpec], batch: bool = True,
                  per_task: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """The Ray configs' trial dicts: one per distinct key, in first-appearance order; model entries whose
    trial has the same key (a regime whose identity ignores the weights) ride along under
    ``shared_models``. With ``batch``, several trials become one config that lists them under
    ``xfer_batch``: the trials of one path group (e.g. a cell's λ grid, solved together), and up to
    ``per_task[regime]`` trials of one cell of a regime without a path (run back to back)."""
    from xfer.regimes import REGIMES

    by_key: dict[str, list[TrialSpec]] = {}
    for t in trials:
        by_key.setdefault(t.key, []).append(t)
    groups: dict[Any, list[dict[str, Any]]] = {}
    chunk: dict[Any, int] = {}  # a cell's current chunk number, for trials_per_task
    for ts in by_key.values():
        d = ts[0].to_dict()
        others = [t.model.to_dict() for t in ts[1:] if t.model.name != ts[0].model.name]
        if others:
            d[SHARED] = others
        group: Any = REGIMES.get(ts[0].regime).path_group(ts[0]) if batch else None
        n = (per_task or {}).get(ts[0].regime, 1) if batch else 1
        if group is None and n > 1:
            cell = (ts[0].cell, ts[0].stage)
            if len(groups.get((cell, chunk.get(cell, 0)), ())) >= n:
                chunk[cell] = chunk.get(cell, 0) + 1
            group = (cell, chunk.get(cell, 0))
        groups.setdefault(group or ts[0].key, []).append(d)
    return [ds[0] if len(ds) == 1 else {**ds[0], writer.BATCH: ds} for ds in groups.values()]


def _compute_features(trial_dict: dict[str, Any], storage: str, data_root: str, download: bool,
                      plugins: Sequence[str] = (), variants: Sequence[tuple[int, str]] = ((0, "avg"),)) -> str:
    """Ray task: fill the feature store for one linear-probe trial's model × dataset (all splits), for
    every feature variant (layer, pooling) the sweep's probes of that pair read."""
    from xfer import features
    from xfer.contract import FeatureVariant

    import_plugins(plugins)
    trial = TrialSpec.from_dict(trial_dict)
    ctx = RunContext.local(storage, data_root, download=download)
    # the grid reads train/val and the final stage trainval/test: all four, every variant, in one backbone build
    features.precompute(trial, ctx, stages=("grid", "final"), variants=[FeatureVariant(*v) for v in variants])
    return trial.key


def check_feature_layers(trials: Sequence[TrialSpec]) -> None:
    """Every probe trial's feature layer exists in its model (one meta-device build per model that reads a
    stage, no weights): a wrong layer fails before anything runs, naming the model's valid layers."""
    from xfer import features
    from xfer.regimes import REGIMES

    deepest: dict[str, tuple[ModelSpec, int]] = {}
    for t in trials:
        regime = REGIMES.get(t.regime)
        if regime.uses_features:
            layer = regime.feature_variant(t).layer
            if layer > deepest.get(t.model.name, (t.model, 0))[1]:
                deepest[t.model.name] = (t.model, layer)
    for model, layer in deepest.values():
        features.check_layer(model.name, features.model_stages(model), layer)


# ------------------------------------------------------------------ Ray connection
def connect_ray(address: str | None) -> str:
    """Join a cluster (``--address``, or ``RAY_ADDRESS`` as inside ``ray job submit``) or start a
    local Ray sized to this machine. Returns a short description for the log."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "ray (already initialised)"
    if address:
        ray.init(address=address, log_to_driver=False)
        return f"ray cluster at {address}"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster for this process
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024, _node_ip_address="127.0.0.1")
    return f"local ray ({os.cpu_count()} CPUs)"


# ------------------------------------------------------------------ stages
class SweepInterrupted(Exception):
    """Tune stopped before every trial reported (Ctrl-C); Ray's state is saved for --resume."""


@dataclass
class StageOutcome:
    stage: str
    total: int
    skipped: int
    ran: int
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)


def _resources(spec: SweepSpec):
    from ray import tune

    def for_config(config: dict[str, Any]):
        trial = config["trial"]
        res = spec.resources_for(trial["regime"], (trial.get("model") or {}).get("name"))
        if res.get("workers", 1) > 1:  # data-parallel: the workers hold the resources, the trial only drives them
            return tune.PlacementGroupFactory([{"CPU": 1.0}])
        bundle = {"CPU": float(res["cpu"])}
        if res["gpu"]:
            bundle["GPU"] = float(res["gpu"])
        return tune.PlacementGroupFactory([bundle])

    return for_config


def _trial_dirname(trial) -> str:
    t = TrialSpec.from_config(trial.config)
    return f"{t.regime}-{t.key}"


def _quiet_ray_tune() -> None:
    """Our ProgressCallback is the live view: turn off Tune's own tables and banners (the new output
    engine prints a configuration box even at verbose=0)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _tune_parts(spec: SweepSpec, paths: StorageLayout):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trainable, storage=str(paths.storage), data_root=str(paths.data_root),
                             download=spec.download, plugins=tuple(spec.plugins),
                             pretrain_resources=spec.resources_for("pretrain")),
        _resources(spec))
    return trainable


def _tune_config(spec: SweepSpec, max_concurrent: int | None, **kw):
    from ray import tune

    # reuse_actors: a trial process (torch, timm, cached datasets already loaded) serves the next trial
    # with the same resources — on small trials this is most of the wall time (benchmarks/)
    return tune.TuneConfig(max_concurrent_trials=max_concurrent or spec.max_concurrent, reuse_actors=True,
                           trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname, **kw)


def _run_config(name: str, paths: StorageLayout, callbacks: list):
    from ray import tune

    return tune.RunConfig(name=name, storage_path=str(paths.ray), callbacks=callbacks, verbose=0,
                          failure_config=tune.FailureConfig(max_failures=1))  # a dead worker: one retry


def _fit(tuner, stage: str, spec: SweepSpec, count: set[str] | None = None,
         early_stop: writer.EarlyStops | None = None) -> dict[str, int]:
    """Run a Tuner; count trial statuses (only of the keys in ``count`` when given: a restored experiment
    also returns the trials an earlier invocation finished); a trial without its final report means Tune
    was interrupted — unless ``early_stop``'s scheduler stopped it (``stopped``)."""
    statuses: dict[str, int] = {}
    unfinished = 0
    stopped = early_stop.stopped if early_stop is not None else {}
    for r in tuner.fit():
        metrics = r.metrics or {}
        if not metrics.get(writer.FINAL) and r.error is None:
            if TrialSpec.from_config(r.config).key in stopped:
                statuses["stopped"] = statuses.get("stopped", 0) + 1
            else:
                unfinished += 1  # stopped before its final report: Tune was interrupted (Ctrl-C / SIGINT)
            continue
        found = [json.loads(e["record"])["status"] for e in writer.final_entries(r.config, metrics)
                 if count is None or e["key"] in count] if metrics.get(writer.FINAL) else ["failed"]
        for s in found:
            statuses[s] = statuses.get(s, 0) + 1
    if unfinished:
        raise SweepInterrupted(f"{stage}: interrupted with {unfinished} trial(s) unfinished; "
                               f"continue with `xfer sweep {spec.path or 'SPEC'} --resume`")
    return statuses


def _restore_would_rerun(exp_path: Path, done: set[str]) -> list[str]:
    """Keys MLflow already holds as finished/diverged that Ray's saved experiment state at ``exp_path``
    still has as unfinished (pending, running, errored): ``Tuner.restore`` would train them again.

    Tune snapshots its state every ~10 s (``checkpoint_period="auto"``), so a driver killed (SIGKILL, a
    lost node or pod) soon after a trial finished leaves a snapshot in which that trial is still running."""
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")  # "no results yet" for unstarted trials
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        trials = ExperimentAnalysis(str(exp_path)).trials
    except Exception as e:  # noqa: BLE001 - an unreadable state: Tuner.restore decides (as before this check)
        log.warning("could not read Ray's experiment state at %s: %s", exp_path, e)
        return []
    finally:
        quiet.setLevel(level)
    found = []
    for t in trials:
        if t.status == "TERMINATED":
            continue
        batch = (t.config.get("trial") or {}).get(writer.BATCH)
        keys = [TrialSpec.from_dict(d).key for d in batch] if batch else [TrialSpec.from_config(t.config).key]
        found += [k for k in keys if k in done]
    return found


def run_stage(stage: str, trials: Sequence[TrialSpec], *, spec: SweepSpec, paths: StorageLayout, tracker,
              resume: bool = False, max_concurrent: int | None = None, quiet: bool = False,
              stream: IO[str] | None = None, rerun: set[str] = frozenset(), scheduler: Any = None,
              label: str | None = None) -> StageOutcome:
    """Run ``trials`` as one Tune experiment (a grid over the trial list), skipping keys MLflow
    already has as finished/diverged; ``resume`` restores the stage's Tune experiment instead.

    ``scheduler`` (an ``EarlyStops`` Tune scheduler, e.g. ``xfer.asha.CellASHA``): it may stop trials
    early, so every trial is its own Ray trial (no batching), a stopped key counts as done (its
    decision stands on a rerun), and ``resume`` is a rerun. ``label``: the stage's name in the log and
    its Tune experiment's (``{sweep}-{label}``)."""
    from ray import tune

    from xfer import select, tracking
    from xfer.progress import ProgressCallback

    _quiet_ray_tune()
    out = stream or sys.stdout
    t0 = time.perf_counter()
    label = label or stage
    resume = resume and scheduler is None
    done = tracking.finished_keys(tracker.uri, tracker.experiment_name, stage,
                                  statuses=("finished", "diverged", "stopped") if scheduler is not None else
                                  RESULT_STATUSES)
    if tracker.journal is not None:
        done |= tracker.journal.keys(stage)  # results kept while the server was away: not run again
    keys = {t.key for t in trials}
    todo = [t for t in trials if t.key not in done or t.key in rerun]
    n_todo = len({t.key for t in todo})
    shared = f" ({len(trials)} cells share {len(keys)} trials)" if len(keys) < len(trials) else ""
    print(f"{label}: {len(keys)} trials{shared} — {len(keys) - n_todo} done, {n_todo} to run", file=out, flush=True)
    exp_name = f"{spec.name}-{label}"
    exp_path = paths.ray / exp_name
    restoring = resume and tune.Tuner.can_restore(str(exp_path))
    if restoring:
        again = _restore_would_rerun(exp_path, done - set(rerun))
        if again:  # restoring would train finished trials again: run the unfinished ones afresh instead
            print(f"{stage}: not restoring the Tune experiment at {exp_path}: it was saved before {len(again)} of "
                  f"its trial(s) finished; running the {n_todo} unfinished trial(s) anew (each goes on from its "
                  f"own checkpoint)", file=out, flush=True)
            restoring = False
    if not todo and not restoring:
        return StageOutcome(label, len(keys), len(keys), 0, time.perf_counter() - t0)

    trainable = _tune_parts(spec, paths)
    callbacks = [tracker.callback(scheduler), ProgressCallback(label, n_todo, stream=out, quiet=quiet)]
    if restoring:
        print(f"{stage}: resuming the Tune experiment at {exp_path}", file=out, flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
        # The restored RunConfig carries the previous invocation's callbacks (pickled in tuner.pkl);
        # this invocation has its own parent run and progress view. No public setter exists.
        tuner._local_tuner._run_config.callbacks = callbacks  # noqa: SLF001
    else:
        configs = trial_configs(todo, batch=scheduler is None, per_task=spec.trials_per_task)
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(configs)},
                           tune_config=_tune_config(spec, max_concurrent, scheduler=scheduler),
                           run_config=_run_config(exp_name, paths, callbacks))
    statuses = _fit(tuner, stage, spec, count={t.key for t in todo}, early_stop=scheduler)
    return StageOutcome(label, len(keys), len(keys) - n_todo, n_todo, time.perf_counter() - t0, statuses)


def run_search(trials: Sequence[TrialSpec], *, spec: SweepSpec, paths: StorageLayout, tracker,
               max_concurrent: int | None = None, quiet: bool = False, stream: IO[str] | None = None,
               resume: bool = False) -> StageOutcome:
    """``search: {type: optuna, num_samples: N}``: instead of the full grid, Optuna's TPE picks N
    points of each (model, dataset, regime, seed) cell's grid, one cell after another. Sampled points
    are grid points, so their trial keys are grid keys: reruns count what a cell already has (and
    ``resume`` is the same as a rerun here)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from xfer import select, tracking
    from xfer.progress import ProgressCallback

    _quiet_ray_tune()
    out = stream or sys.stdout
    t0 = time.perf_counter()
    n, seed = int(spec.search["num_samples"]), int(spec.search.get("seed", 0))
    done = tracking.finished_keys(tracker.uri, tracker.experiment_name, "grid")
    cells: dict[tuple, list[TrialSpec]] = {}
    for t in trials:  # a cell axis (schedule, training-set size) is part of the cell, never searched over
        cells.setdefault(select.cell_of(t) + (t.seed,), []).append(t)
    todo = {c: max(0, min(n, len(ts)) - sum(t.key in done for t in ts)) for c, ts in cells.items()}
    total, left = sum(min(n, len(ts)) for ts in cells.values()), sum(todo.values())
    print(f"grid (optuna, {n} per cell): {total} trials — {total - left} done, {left} to run", file=out, flush=True)
    statuses: dict[str, int] = {}
    trainable = _tune_parts(spec, paths)
    progress = ProgressCallback("grid", left, stream=out, quiet=quiet)
    for cell, ts in cells.items():
        if not todo[cell]:
            continue
        base = ts[0]
        space = {"trial": trial_configs([base])[0],
                 **{axis: tune.choice(sorted({t.hparams[axis] for t in ts})) for axis in base.hparams
                    if axis not in dict(select.cell_point(base.regime, base.hparams))}}
        searcher = OptunaSearch(metric="xfer_objective", mode="max", seed=seed)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=_tune_config(spec, max_concurrent, num_samples=todo[cell],
                                     search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or 2)),
            run_config=_run_config(f"{spec.name}-optuna-{base.key}", paths, [tracker.callback(), progress]))
        for k, v in _fit(tuner, "grid", spec).items():
            statuses[k] = statuses.get(k, 0) + v
    return StageOutcome("grid", total, total - left, left, time.perf_counter() - t0, statuses)


def _grid_search(trials: Sequence[TrialSpec], **kw: Any) -> list[StageOutcome]:
    return [run_stage("grid", trials, **kw)]


def _optuna_search(trials: Sequence[TrialSpec], **kw: Any) -> list[StageOutcome]:
    return [run_search(trials, **kw)]


def _asha_search(trials: Sequence[TrialSpec], *, spec: SweepSpec, **kw: Any) -> list[StageOutcome]:
    """``search: {type: asha}`` (``xfer.asha``): the other regimes' full grid, then the early-stopping
    regimes' trials under ``CellASHA``, then (``audit``) the trials it stopped, run to the end (a plain
    grid pass: they are not finished, so it runs them, into their own MLflow runs)."""
    from xfer.asha import CellASHA, stoppable

    ours, others = stoppable(trials)
    out = [run_stage("grid", others, spec=spec, **kw)] if others else []
    asha = CellASHA(spec.search["grace_steps"], spec.search["reduction_factor"])
    out.append(run_stage("grid", ours, spec=spec, scheduler=asha, label="grid-asha", **kw))
    if spec.search["audit"]:
        out.append(run_stage("grid", ours, spec=spec, label="grid-audit", **kw))
    return out


# search type (``spec.SEARCH_KEYS``) -> how the grid stage runs: its stage outcomes
SEARCHES: dict[str, Callable[..., list[StageOutcome]]] = {"grid": _grid_search, "optuna": _optuna_search,
                                                          "asha": _asha_search}


def run_features(trials: Sequence[TrialSpec], *, spec: SweepSpec, paths: StorageLayout,
                 stream: IO[str] | None = None) -> int:
    """Compute frozen features once per (weights, dataset) for every linear-probe trial, in parallel
    Ray tasks, before the grid (so the 45-value λ grid never recomputes them): one task per pair, which
    extracts every feature variant (layer, pooling) the pair's trials read in one pass per split. A layer
    a model does not have fails here, before any task, naming the model's valid layers."""
    import ray

    from xfer import features

    out = stream or sys.stdout
    from xfer.regimes import REGIMES

    ctx = RunContext(layout=paths, download=spec.download)
    need: dict[str, tuple[TrialSpec, dict[tuple[int, str], None]]] = {}
    for t in trials:
        regime = REGIMES.get(t.regime)
        if not regime.uses_features:
            continue
        variant = regime.feature_variant(t)
        keys = [features.feature_key(t.model, t.dataset, split, ctx, v) for v in (features.DEFAULT, variant)
                for split in ("train", "val", "trainval", "test")]
        pair = "|".join(keys[:4])  # the default variant's keys name the (weights, dataset) pair
        if not all(paths.feature_file(k).exists() for k in keys[4:]):
            need.setdefault(pair, (t, {}))[1][(variant.layer, variant.pool)] = None
    if not need:
        return 0
    task = ray.remote(max_retries=1)(_compute_features)
    n_sets = sum(len(v) for _, v in need.values())
    print(f"features: computing {n_sets} frozen-feature sets ({len(need)} model × dataset pairs)", file=out,
          flush=True)
    refs = []
    for t, variants in need.values():  # each on its model's resources (a small model can take a GPU fraction)
        res = spec.resources_for(t.regime, t.model.name)
        refs.append(task.options(num_cpus=res["cpu"], num_gpus=res["gpu"]).remote(
            t.to_dict(), str(paths.storage), str(paths.data_root), spec.download, tuple(spec.plugins),
            tuple(variants)))
    for i, ref in enumerate(refs, 1):
        ray.get(ref)
        print(f"[features {i}/{len(refs)}] done", file=out, flush=True)
    return len(need)


# ------------------------------------------------------------------ the command
@dataclass
class SweepResult:
    experiment: str
    tracking_uri: str
    parent_run_id: str
    stages: list[StageOutcome]
    report: dict[str, Any] | None = None


def run_sweep(spec: SweepSpec, *, tracking_uri: str | None = None, address: str | None = None,
              storage: str | None = None, data_root: str | None = None, resume: bool = False,
              final: bool | None = None, max_concurrent: int | None = None, report_dir: str | None = None,
              quiet: bool = False, stream: IO[str] | None = None, min_free: int | None = None,
              final_wait_s: float = 600.0) -> SweepResult:
    """Run the study's stages. Before anything starts (Ray, the MLflow parent run) the tracking server
    must answer and the storage must take writes and have ``min_free`` bytes free (default: the spec's
    ``min_free_space``) — a full or read-only storage fails here, as one ``StorageError``, not in every
    trial; a probe's feature layer the model lacks fails here too (``check_feature_layers``).
    ``final_wait_s``: how long the final stage waits for a tracking server that went away to take
    the journaled grid results before it gives up."""
    from xfer import tracking
    from xfer.tracking.writer import SweepTracker

    out = stream or sys.stdout
    grid = spec.grid_trials()  # enumerated once: checked here, run below
    check_feature_layers(grid)
    uri = tracking.absolute_sqlite(tracking.resolve_tracking_uri(tracking_uri, spec.tracking_uri))
    tracking.check_reachable(uri)
    paths = StorageLayout(Path(storage or spec.storage), Path(data_root or spec.data_root))
    paths.preflight(spec.min_free_space if min_free is None else min_free)
    where = connect_ray(address)
    import ray

    _print_cost(spec, paths, out, ray.cluster_resources())
    tracker = SweepTracker(uri, spec.name, journal_dir=paths.journal_dir(spec.name))
    from xfer.spec import plan

    summary = {k: v for k, v in plan(spec).items() if k != "by_model_dataset"}
    parent = tracker.start_parent(summary, spec_path=spec.path)
    print(f"sweep {spec.name}: {where}; tracking {tracking.redact_uri(uri)} (parent run {parent})", file=out,
          flush=True)
    waiting = len(tracker.journal)
    if waiting:  # results an earlier invocation kept while the server was away
        left = tracker.flush_journal()
        print(f"tracking: logged {waiting - left} result(s) an earlier invocation kept in {tracker.journal.folder}"
              + (f"; {left} still waiting" if left else ""), file=out, flush=True)
    stages: list[StageOutcome] = []
    status = "failed"
    try:
        kw = dict(spec=spec, paths=paths, tracker=tracker, resume=resume, max_concurrent=max_concurrent,
                  quiet=quiet, stream=out)
        pre = spec.pretrain_trials()
        if pre:
            # a pretrain trial counts as done only if its checkpoint is on *this* storage too, and intact
            # (its SHA-256 matches meta.json); a new storage path re-makes checkpoints and a corrupt one is
            # retrained (into the same MLflow run, found by key)
            from xfer.models import pretrain_checkpoint_problem

            missing = {t.key for t in pre if pretrain_checkpoint_problem(paths.checkpoint_dir(t.key)) is not None}
            stages.append(run_stage("pretrain", pre, rerun=missing, **kw))
        run_features(grid, spec=spec, paths=paths, stream=out)
        if spec.estimators:  # opt-in: transferability estimators on the cached features, no training
            from xfer.estimate import run_estimates

            t0 = time.perf_counter()
            total, ran = run_estimates(spec, paths, tracker, stream=out)
            stages.append(StageOutcome("estimate", total, total - ran, ran, time.perf_counter() - t0,
                                       {"finished": ran} if ran else {}))
        stages += SEARCHES[spec.search["type"]](grid, **kw)
        report = None
        if (spec.final if final is None else final):
            from xfer import final as final_stage

            left = tracker.flush_journal(wait_s=final_wait_s, stream=out)
            if left:
                raise tracking.TrackingError(
                    f"{left} grid result(s) are kept in {tracker.journal.folder} but not yet in MLflow at "
                    f"{tracking.redact_uri(uri)}, "
                    "and selection reads MLflow: start the tracking server and run the same `xfer sweep` again "
                    "(it logs them first and runs nothing twice)")
            finals = final_stage.final_trials_for(spec, uri, stream=out)
            stages.append(run_stage("final", finals, **kw))
            report = final_stage.write_report(spec, uri, parent, paths, report_dir=report_dir, stream=out)
        status = "finished"
        return SweepResult(spec.name, uri, parent, stages, report)
    except (SweepInterrupted, KeyboardInterrupt):
        status = "killed"
        raise
    finally:
        try:
            tracker.end_parent(status)
        except Exception as e:  # noqa: BLE001 - an unreachable server must not hide the sweep's own outcome
            if not tracking.is_outage(e):
                raise
            print(f"tracking: could not close the parent run {parent} ({tracking.TrackingError.__name__}: server "
                  f"unreachable); it stays RUNNING in MLflow", file=out, flush=True)
        _print_summary(spec, uri, stages, out)


def _print_cost(spec: SweepSpec, paths: StorageLayout, out: IO[str], cluster: Mapping[str, float]) -> None:
    """The plan's cost, one short block before anything runs: calibrated speeds where ``xfer plan --calibrate``
    cached them, else the FLOP model — never a calibration here. Wall time is on the ``cluster``'s GPUs and
    CPUs (Ray's resources). A plan that cannot be made (a dataset it cannot size) is a note, not a failed sweep."""
    from xfer.cost import format_plan, plan_cost

    try:
        cost = plan_cost(spec, layout=paths, gpus=cluster.get("GPU", 0) or 1, cpus=cluster.get("CPU"))
    except Exception as e:  # noqa: BLE001 - an estimate that cannot be made must not stop the sweep
        print(f"plan: no cost estimate ({type(e).__name__}: {e})", file=out, flush=True)
        return
    print("plan (device-hours; `xfer plan` for the table and its assumptions):", file=out)
    print("\n".join(format_plan(cost, brief=True)), file=out, flush=True)


def _print_summary(spec: SweepSpec, uri: str, stages: list[StageOutcome], out: IO[str]) -> None:
    from xfer.tracking import redact_uri

    uri = redact_uri(uri)  # shown, never the credentials a URI may carry
    print("", file=out)
    print(f"== sweep {spec.name} summary ==", file=out)
    for s in stages:
        st = ", ".join(f"{k} {v}" for k, v in sorted(s.statuses.items())) or "nothing run"
        unit = "pairs" if s.stage == "estimate" else "trials"  # (model, dataset) pairs, not trials
        print(f"  {s.stage:<9} {s.total:>5} {unit}: {s.skipped} already done, {s.ran} run ({st}) in {s.seconds:.0f}s",
              file=out)
    print(f"  MLflow experiment: {spec.name!r} at {uri}", file=out)
    if uri.startswith("sqlite:"):
        print(f"  browse: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)", file=out)
    else:
        print(f"  browse: {uri}", file=out)
    out.flush()


def run_sweep_cli(args) -> int:
    spec = load_spec(args.spec)
    try:
        result = run_sweep(spec, tracking_uri=args.tracking_uri, address=args.address, storage=args.storage,
                           data_root=args.data_root, resume=args.resume, final=False if args.no_final else None,
                           max_concurrent=args.max_concurrent, report_dir=args.report_dir, quiet=args.quiet,
                           min_free=getattr(args, "min_free", None))
    except SweepInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    failed = sum(s.statuses.get("failed", 0) for s in result.stages)
    return 1 if failed else 0

