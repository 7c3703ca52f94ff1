"""Sweep files: a YAML study description → a validated ``SweepSpec`` → grid trials.

Every problem raises ``SpecError`` naming the key path and what is valid. What a regime accepts (its
grid axes, their validity, its options) is read from the regime's own declaration
(``xfer.regimes.base.Regime``), so this module names no regime's hyper-parameters. Structural mistakes
are found before anything heavy is imported; dataset and model names are checked last (the dataset
registry imports torch; architecture names come from a cached index of timm's names).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from xfer.hashing import canonical
from xfer.io import parse_size
from xfer.layout import DEFAULT_MIN_FREE, LayoutError, safe_name
from xfer.plugins import PluginError, import_plugins
from xfer.options import OptionError, is_number, unknown_key_message, yaml_number
from xfer.regimes import REGIMES, Axis, Regime
from xfer.timm_names import UnknownArchitectureError, check_arch
from xfer.tracking.uri import has_credentials, redact_uri
from xfer.trial import WEIGHT_SOURCES, DatasetRef, ModelSpec, PretrainSpec, TrialSpec


class SpecError(ValueError):
    """A spec problem; the message names the key path and what is valid."""


TOP_KEYS = {
    "name": "sweep name (one MLflow experiment per name; letters, digits, _ . -)",
    "description": "free text",
    "seeds": "list of ints (default [0])",
    "data_root": "where datasets live (default ./data)",
    "storage": "checkpoints, features and Ray results (default ./xfer-results)",
    "tracking_uri": "MLflow tracking URI (default sqlite:///mlflow.db)",
    "download": "allow torchvision dataset downloads (default false)",
    "models": "list of models",
    "datasets": "list of dataset names or {name, label, options...}",
    "regimes": "mapping regime -> {grid: {...}, options...}",
    "resources": "mapping regime -> {cpu, gpu} per trial (+ models: {model name: {cpu, gpu}} to pack small models; pretrain also workers: N, each with cpu/gpu)",
    "search": "{type: grid} (default), {type: optuna, num_samples, seed} or {type: asha, grace_steps, reduction_factor, audit}",
    "final": "{enabled: true} — retrain the best config on train+val and test once",
    "max_concurrent": "cap on trials running at once (default: as resources allow)",
    "min_free_space": "free space the storage must have before the sweep starts, e.g. 2GB (default 256MB; 0: off)",
    "plugins": "modules imported first, in the driver and every trial process (they register regimes, datasets)",
    "estimators": "transferability estimators scored per model x dataset before the grid, e.g. [logme, leep, nce, hscore]",
}
MODEL_KEYS = ("name", "arch", "weights", "weights_file", "pretrain", "source_top1", "input_size", "paper_name",
              "stand_in")
# search type -> the keys it takes besides `type` (its required ones are checked in _search)
SEARCH_KEYS = {"grid": (), "optuna": ("num_samples", "seed"), "asha": ("grace_steps", "reduction_factor", "audit")}
SEARCH_TYPES = tuple(SEARCH_KEYS)
RESOURCE_KEYS = ("cpu", "gpu", "models", "workers")  # workers: pretrain only (data-parallel, xfer.distributed)
AMOUNT_KEYS = ("cpu", "gpu")


def _type_name(v: Any) -> str:
    return type(v).__name__


def _expect(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise SpecError(f"{path}: {msg}")


def _check_keys(d: Mapping[str, Any], valid: Iterable[str], path: str) -> None:
    valid = list(valid)
    for k in d:
        if k not in valid:
            raise SpecError(unknown_key_message(k, valid, path))


def _expand_values(raw: Any, path: str) -> list[float]:
    """A grid axis: a number, a list of numbers, or {logspace: [start, stop, num]} (endpoints are
    values, not exponents), or a list mixing numbers and logspace blocks (e.g. ``[0, {logspace: …}]``)."""
    items = raw if isinstance(raw, list) else [raw]
    out: list[float] = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]" if isinstance(raw, list) else path
        item = yaml_number(item)
        if is_number(item):
            out.append(float(item))
        elif isinstance(item, Mapping) and set(item) == {"logspace"}:
            ls = [yaml_number(x) for x in item["logspace"]] if isinstance(item["logspace"], list) else item["logspace"]
            _expect(isinstance(ls, list) and len(ls) == 3 and all(is_number(x) for x in ls),
                    ipath, f"logspace takes [start, stop, num], got {ls!r}")
            a, b, n = ls
            _expect(a > 0 and b > 0, ipath, "logspace endpoints must be > 0")
            _expect(float(n).is_integer() and n >= 1, ipath, "logspace num must be an integer >= 1")
            n = int(n)
            if n == 1:
                out.append(float(a))
            else:
                la, lb = math.log10(a), math.log10(b)
                out.extend(float(10 ** (la + (lb - la) * k / (n - 1))) for k in range(n))
        else:
            raise SpecError(f"{ipath}: expected a number, a list of numbers or {{logspace: [start, stop, num]}}, "
                            f"got {item!r}")
    _expect(len(out) > 0, path, "the grid is empty; give at least one value")
    _expect(len(set(out)) == len(out), path, f"the grid has repeated values: {out}")
    return out


def _options(regime: Regime, raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    try:
        return regime.check_options(raw, path)
    except OptionError as e:
        raise SpecError(str(e)) from None


def dataset_ref(raw: Any, path: str) -> DatasetRef:
    """A dataset entry of a spec (a name, or ``{name, label, options...}``), checked against the
    dataset registry: known name, known options of the right kind."""
    from xfer.data import DATASETS, dataset_option_names, resolve_options

    if isinstance(raw, str):
        raw = {"name": raw}
    _expect(isinstance(raw, Mapping), path, f"expected a dataset name or a mapping with 'name', got {raw!r}")
    name = raw.get("name")
    _expect(isinstance(name, str), f"{path}.name", "required (a registered dataset name)")
    if name not in DATASETS:
        raise SpecError(f"{path}.name: {DATASETS.unknown_message(name)}")
    _check_keys(raw, [*sorted(dataset_option_names(name)), "name", "label"], path)
    options = {k: v for k, v in raw.items() if k not in ("name", "label")}
    try:
        resolve_options(name, options, path)
    except OptionError as e:
        raise SpecError(str(e)) from None
    label = raw.get("label")
    _expect(label is None or isinstance(label, str), f"{path}.label", "must be a string")
    return DatasetRef(name=name, options=options, label=label)


def model_spec(raw: Any, path: str, seeds: list[int]) -> ModelSpec:
    """A model entry of a spec, checked (weights source, architecture name, pretrain block)."""
    _expect(isinstance(raw, Mapping), path, f"expected a mapping with name and arch, got {raw!r}")
    _check_keys(raw, MODEL_KEYS, path)
    for k in ("name", "arch"):
        _expect(isinstance(raw.get(k), str) and raw.get(k), f"{path}.{k}", "required (a non-empty string)")
    weights = raw.get("weights", "hub")
    _expect(isinstance(weights, str), f"{path}.weights", "expected a string")
    weights_file = raw.get("weights_file")
    if weights not in WEIGHT_SOURCES:
        # shorthand: a path to a local weights file
        if "/" in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")):
            weights, weights_file = "file", weights
        else:
            raise SpecError(f"{path}.weights: unknown weight source {weights!r}; valid: "
                            f"{', '.join(WEIGHT_SOURCES)} or a path to a weights file")
    if weights == "file":
        _expect(isinstance(weights_file, str) and weights_file, f"{path}.weights_file",
                "required when weights is 'file' (a path to a state dict)")
    try:
        check_arch(raw["arch"], pretrained=weights == "hub")
    except UnknownArchitectureError as e:
        raise SpecError(f"{path}.arch: {e}") from None
    pretrain = None
    if weights == "pretrain":
        pre = raw.get("pretrain")
        _expect(isinstance(pre, Mapping), f"{path}.pretrain",
                "required when weights is 'pretrain': {dataset: NAME, steps: N, lr: X, ...}")
        pre = dict(pre)
        _expect("dataset" in pre, f"{path}.pretrain.dataset", "required (the source dataset)")
        ds = dataset_ref(pre.pop("dataset"), f"{path}.pretrain.dataset")
        seed = pre.pop("seed", seeds[0])
        _expect(isinstance(seed, int) and not isinstance(seed, bool), f"{path}.pretrain.seed", "expected an int")
        opts = _options(REGIMES.get("pretrain"), pre, f"{path}.pretrain")
        pretrain = PretrainSpec(dataset=ds, options=opts, seed=seed)
    elif raw.get("pretrain") is not None:
        raise SpecError(f"{path}.pretrain: only used with weights: pretrain (weights is {weights!r})")
    top1 = yaml_number(raw.get("source_top1"))
    if top1 is not None:
        _expect(is_number(top1) and 0 <= top1 <= 1, f"{path}.source_top1",
                f"a fraction in [0, 1] (76.1% -> 0.761), got {top1!r}")
    size = raw.get("input_size")
    if size is not None:
        _expect(isinstance(size, int) and not isinstance(size, bool) and size >= 8, f"{path}.input_size",
                f"an integer >= 8 (pixels), got {size!r}")
    paper = raw.get("paper_name")
    _expect(paper is None or isinstance(paper, str), f"{path}.paper_name", "must be a string")
    stand_in = raw.get("stand_in")
    _expect(stand_in is None or isinstance(stand_in, bool), f"{path}.stand_in",
            f"true or false (whether the entry runs other weights than its paper model), got {stand_in!r}")
    _expect(not stand_in or bool(paper), f"{path}.stand_in",
            "a stand-in needs paper_name: the paper model it stands for")
    return ModelSpec(name=raw["name"], arch=raw["arch"], weights=weights, weights_file=weights_file,
                     pretrain=pretrain, source_top1=None if top1 is None else float(top1),
                     input_size=size, paper_name=paper, stand_in=stand_in)


def _axis_values(axis: Axis, raw: Any, path: str) -> list[float]:
    """A grid axis's values, checked: numbers (``_expand_values``), or names on a named axis
    (``pool: [avg, max]``, held as their indices)."""
    if axis.names:
        items = raw if isinstance(raw, list) else [raw]
        try:
            return [axis.check(v, f"{path}[{i}]" if isinstance(raw, list) else path) for i, v in enumerate(items)]
        except OptionError as e:
            raise SpecError(str(e)) from None
    values = _expand_values(raw, path)
    bad = [v for v in values if not axis.valid(v)]
    _expect(not bad, path, f"values must be {axis.rule}, got {bad}")
    return values


@dataclass(frozen=True)
class RegimeSpec:
    name: str
    grid: Mapping[str, list[float]]
    options: Mapping[str, Any]
    # grid trials of one cell run back to back in one Ray task: for trials of a few seconds, where Ray's
    # and MLflow's per-trial cost would exceed the compute (not in trial keys: it changes no result)
    trials_per_task: int = 1


def _regime(name: str, raw: Any, path: str) -> RegimeSpec:
    if name not in REGIMES:
        raise SpecError(f"{path}: {REGIMES.unknown_message(name)}")
    regime = REGIMES.get(name)
    if not regime.grid:
        raise SpecError(f"{path}: {name!r} is not a grid regime; give a model `weights: pretrain` "
                        "and a `pretrain:` block instead")
    raw = {} if raw is None else raw
    _expect(isinstance(raw, Mapping), path, f"expected a mapping {{grid: ..., options...}}, got {raw!r}")
    raw = dict(raw)
    grid_raw = raw.pop("grid", None)
    per_task = raw.pop("trials_per_task", 1)
    _expect(isinstance(per_task, int) and not isinstance(per_task, bool) and per_task >= 1,
            f"{path}.trials_per_task", f"an integer >= 1 (grid trials run back to back in one task), got {per_task!r}")
    _expect(isinstance(grid_raw, Mapping), f"{path}.grid",
            f"required: a mapping of {', '.join(regime.axis_names)} to values")
    _check_keys(grid_raw, regime.axis_names, f"{path}.grid")
    grid: dict[str, list[float]] = {}
    for axis in regime.axes:
        if axis.name not in grid_raw and axis.default is not None:
            continue  # a cell axis the sweep does not name: its trials run (and key as) its default
        _expect(axis.name in grid_raw, f"{path}.grid.{axis.name}", "missing; every axis of the regime needs values")
        values = _axis_values(axis, grid_raw[axis.name], f"{path}.grid.{axis.name}")
        if axis.cell and not any(axis.is_default(v) for v in values):
            raise SpecError(f"{path}.grid.{axis.name}: a cell axis must include its default "
                            f"{axis.label(axis.default)} (the cell the main analysis compares across models and "
                            "regimes; every other value is a cell of its own), got "
                            f"{[axis.label(v) for v in values]}")
        grid[axis.name] = values
    return RegimeSpec(name=name, grid=grid, options=_options(regime, raw, path), trials_per_task=per_task)


@dataclass(frozen=True)
class SweepSpec:
    """A validated study: see ``load_spec``."""

    name: str
    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetRef, ...]
    regimes: tuple[RegimeSpec, ...]
    seeds: tuple[int, ...] = (0,)
    description: str = ""
    data_root: str = "./data"
    storage: str = "./xfer-results"
    tracking_uri: str | None = None
    download: bool = False
    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    search: Mapping[str, Any] = field(default_factory=lambda: {"type": "grid"})
    final: bool = True
    max_concurrent: int | None = None
    plugins: tuple[str, ...] = ()
    estimators: tuple[str, ...] = ()  # the estimate stage's estimators (xfer.estimators.ESTIMATORS); () = off
    path: str | None = None
    min_free_space: int = DEFAULT_MIN_FREE  # bytes; checked before a sweep starts (xfer.layout.preflight)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def pretrain_trials(self) -> list[TrialSpec]:
        """One source-training trial per distinct pretrain key, in model order."""
        seen: dict[str, TrialSpec] = {}
        for m in self.models:
            if m.weights == "pretrain":
                t = m.pretrain_trial()
                seen.setdefault(t.key, t)
        return list(seen.values())

    def grid_trials(self) -> list[TrialSpec]:
        """Every grid trial: seeds × models × datasets × regimes × grid product, in a stable order."""
        out: list[TrialSpec] = []
        for seed in self.seeds:
            for m in self.models:
                for ds in self.datasets:
                    for r in self.regimes:
                        rule = REGIMES.get(r.name).key_rule
                        axes = list(r.grid)
                        for values in itertools.product(*(r.grid[a] for a in axes)):
                            out.append(TrialSpec(model=m, dataset=ds, regime=r.name,
                                                 hparams=dict(zip(axes, values)), options=dict(r.options),
                                                 seed=seed, stage="grid", key_rule=rule))
        return out

    @property
    def trials_per_task(self) -> dict[str, int]:
        """Regime -> grid trials per Ray task (see ``RegimeSpec.trials_per_task``)."""
        return {r.name: r.trials_per_task for r in self.regimes}

    def resources_for(self, regime: str, model: str | None = None) -> dict[str, float]:
        """CPUs and GPUs of one trial: the regime's, or the model's own under ``resources.<regime>.models``
        (a fractional GPU packs several small-model trials onto one device)."""
        res = {"cpu": 1.0, "gpu": 0.0}
        regime_res = self.resources.get(regime, {})
        res.update({k: float(v) for k, v in regime_res.items() if k in AMOUNT_KEYS})
        if "workers" in regime_res:  # pretrain: data-parallel workers, each with this cpu/gpu
            res["workers"] = int(regime_res["workers"])
        res.update({k: float(v) for k, v in (regime_res.get("models") or {}).get(model, {}).items()})
        return res


def _estimators(raw: Any) -> tuple[str, ...]:
    """``estimators: [logme, leep, ...]``: registered names, each once (numpy only: stays cheap)."""
    from xfer.estimators import ESTIMATORS

    if raw is None:
        return ()
    valid = ", ".join(ESTIMATORS.names())
    _expect(isinstance(raw, list) and all(isinstance(n, str) for n in raw), "spec.estimators",
            f"a list of estimator names (valid: {valid}), got {raw!r}")
    for i, name in enumerate(raw):
        if name not in ESTIMATORS:
            raise SpecError(f"spec.estimators[{i}]: {ESTIMATORS.unknown_message(name)}")
    dup = sorted({n for n in raw if raw.count(n) > 1})
    _expect(not dup, "spec.estimators", f"repeated: {', '.join(dup)}")
    return tuple(raw)


def _check_amounts(res: Mapping[str, Any], path: str) -> None:
    for k in AMOUNT_KEYS:
        if k not in res:
            continue
        v = res[k]
        _expect(is_number(v) and v >= 0, f"{path}.{k}", f"a number >= 0, got {v!r}")
        if k == "gpu" and v > 1:
            _expect(float(v).is_integer(), f"{path}.gpu", "fractions are only allowed below 1")


def _search(raw: Any, regimes: list[RegimeSpec]) -> dict[str, Any]:
    """``search:``: the type, then the keys that type takes (SEARCH_KEYS). ASHA stops trials of the
    early-stopping regimes (``Regime.early_stopping``: fine-tune, scratch) on the validation they report
    every ``eval_every`` steps, so each of them needs ``eval_every`` > 0 and one Ray trial per grid trial
    (no ``trials_per_task``); other regimes (the probe's λ path) run their full grid as usual."""
    _expect(raw is None or isinstance(raw, Mapping), "spec.search",
            f"expected a mapping such as {{type: grid}}; valid types: {', '.join(SEARCH_TYPES)}")
    search = dict(raw or {"type": "grid"})
    kind = search.setdefault("type", "grid")
    _expect(kind in SEARCH_KEYS, "spec.search.type", f"valid: {', '.join(SEARCH_TYPES)}, got {kind!r}")
    _check_keys(search, ("type", *SEARCH_KEYS[kind]), f"spec.search (type {kind})")
    if kind == "optuna":
        n = search.get("num_samples")
        _expect(isinstance(n, int) and n >= 1, "spec.search.num_samples", "required for optuna: an integer >= 1")
    if kind != "asha":
        return search
    g = search.get("grace_steps")
    _expect(isinstance(g, int) and not isinstance(g, bool) and g >= 1, "spec.search.grace_steps",
            f"required for asha: an integer >= 1 (training steps before a trial can be stopped), got {g!r}")
    rf = search.setdefault("reduction_factor", 3)
    _expect(is_number(rf) and rf > 1, "spec.search.reduction_factor",
            f"a number > 1 (1/reduction_factor of the trials go on at each rung), got {rf!r}")
    _expect(isinstance(search.setdefault("audit", False), bool), "spec.search.audit",
            "true (run the stopped trials to the end too, to compare ASHA's picks with the full grid's) or false")
    stoppable = [r for r in regimes if REGIMES.get(r.name).early_stopping]
    valid = ", ".join(n for n in REGIMES.names() if REGIMES.get(n).early_stopping)
    _expect(bool(stoppable), "spec.search.type",
            f"asha stops step-trained regimes early ({valid}); this sweep has none of them")
    for r in stoppable:
        every = {**REGIMES.get(r.name).defaults, **r.options}.get("eval_every", 0)
        _expect(every > 0, f"spec.regimes.{r.name}.eval_every",
                f"search type asha needs validation during training: an integer > 0 (steps between evaluations), "
                f"got {every!r}")
        _expect(r.trials_per_task == 1, f"spec.regimes.{r.name}.trials_per_task",
                "must be 1 under search type asha: ASHA stops Ray trials, so each grid trial is its own")
        budgets = {REGIMES.get(r.name).budget(t) for t in _regime_trials(r)}
        _expect(g < min(budgets), "spec.search.grace_steps",
                f"must be below the steps of every {r.name} trial (the fewest: {min(budgets)}), got {g}")
    return search


def _regime_trials(r: RegimeSpec) -> list[TrialSpec]:
    """One placeholder trial per grid point of ``r`` (for what depends on hyper-parameters and options only)."""
    axes = list(r.grid)
    model = ModelSpec(name="_", arch="_", weights="random")
    return [TrialSpec(model=model, dataset=DatasetRef("_"), regime=r.name, hparams=dict(zip(axes, values)),
                      options=dict(r.options)) for values in itertools.product(*(r.grid[a] for a in axes))]


def parse_spec(raw: Any, path: str | None = None) -> SweepSpec:
    """Validate a parsed YAML document into a SweepSpec (see TOP_KEYS for the schema). Cheap checks
    first; datasets, then models (registry and architecture names) last."""
    _expect(isinstance(raw, Mapping), "spec", f"expected a mapping at the top level, got {_type_name(raw)}")
    _check_keys(raw, TOP_KEYS, "spec")
    name = raw.get("name")
    _expect(isinstance(name, str) and name.strip(), "spec.name", "required (a non-empty string)")
    try:
        safe_name(name.strip(), "sweep name")
    except LayoutError as e:
        raise SpecError(f"spec.name: {e}") from None
    seeds = raw.get("seeds", [0])
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                         for s in seeds),
            "spec.seeds", f"a non-empty list of integers, got {seeds!r}")
    for key in ("models", "datasets"):
        _expect(isinstance(raw.get(key), list) and raw.get(key), f"spec.{key}", "required: a non-empty list")
    plugins = raw.get("plugins") or []
    _expect(isinstance(plugins, list) and all(isinstance(m, str) and m for m in plugins), "spec.plugins",
            f"a list of importable module names, got {plugins!r}")
    try:
        import_plugins(plugins, "spec.plugins")
    except PluginError as e:
        raise SpecError(str(e)) from None
    regimes_raw = raw.get("regimes")
    _expect(isinstance(regimes_raw, Mapping) and regimes_raw, "spec.regimes",
            "required: a mapping of regime name to {grid: ...}")
    regimes = [_regime(str(k), v, f"spec.regimes.{k}") for k, v in regimes_raw.items()]

    resources = raw.get("resources") or {}
    _expect(isinstance(resources, Mapping), "spec.resources", "expected a mapping regime -> {cpu, gpu}")
    for r, res in resources.items():
        _expect(r in REGIMES, f"spec.resources.{r}", REGIMES.unknown_message(r))
        _expect(isinstance(res, Mapping), f"spec.resources.{r}", "expected {cpu: N, gpu: N}")
        _check_keys(res, RESOURCE_KEYS, f"spec.resources.{r}")
        _check_amounts(res, f"spec.resources.{r}")
        per_model = res.get("models") or {}
        _expect(isinstance(per_model, Mapping), f"spec.resources.{r}.models",
                "expected a mapping model name -> {cpu: N, gpu: N}")
        for m, mres in per_model.items():
            _expect(isinstance(mres, Mapping), f"spec.resources.{r}.models.{m}", "expected {cpu: N, gpu: N}")
            _check_keys(mres, AMOUNT_KEYS, f"spec.resources.{r}.models.{m}")
            _check_amounts(mres, f"spec.resources.{r}.models.{m}")
        if "workers" in res:
            v = res["workers"]
            _expect(r == "pretrain", f"spec.resources.{r}.workers",
                    "only pretrain trials run data-parallel over several workers; other regimes take cpu, gpu")
            _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"spec.resources.{r}.workers",
                    f"an integer >= 1 (Ray Train workers, each with this cpu/gpu), got {v!r}")
    search = _search(raw.get("search"), regimes)
    final = raw.get("final", {"enabled": True})
    _expect(isinstance(final, Mapping), "spec.final", "expected {enabled: true|false}")
    _check_keys(final, ("enabled",), "spec.final")
    _expect(isinstance(final.get("enabled", True), bool), "spec.final.enabled", "expected true or false")
    for key in ("data_root", "storage", "tracking_uri", "description"):
        v = raw.get(key)
        _expect(v is None or isinstance(v, str), f"spec.{key}", f"expected a string, got {v!r}")
    # a sweep file is committed, shipped in images and logged as spec.yaml: no credentials in it
    _expect(not raw.get("tracking_uri") or not has_credentials(raw["tracking_uri"]), "spec.tracking_uri",
            f"must not carry credentials ({redact_uri(raw.get('tracking_uri') or '')}); set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment instead")
    _expect(isinstance(raw.get("download", False), bool), "spec.download", "expected true or false")
    mc = raw.get("max_concurrent")
    _expect(mc is None or (isinstance(mc, int) and mc >= 1), "spec.max_concurrent", "an integer >= 1")
    estimators = _estimators(raw.get("estimators"))
    try:
        min_free = parse_size(raw.get("min_free_space", DEFAULT_MIN_FREE), "spec.min_free_space")
    except ValueError as e:
        raise SpecError(str(e)) from None

    datasets = [dataset_ref(d, f"spec.datasets[{i}]") for i, d in enumerate(raw["datasets"])]
    labels = [d.display for d in datasets]
    dup = sorted({n for n in labels if labels.count(n) > 1})
    _expect(not dup, "spec.datasets", f"dataset names must be unique (give a `label`); repeated: {', '.join(dup)}")
    models = [model_spec(m, f"spec.models[{i}]", seeds) for i, m in enumerate(raw["models"])]
    names = [m.name for m in models]
    for r, res in resources.items():  # per-model resources name models of this file
        for m in (res.get("models") or {}):
            _expect(m in names, f"spec.resources.{r}.models.{m}",
                    f"not a model of this sweep; its models: {', '.join(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    _expect(not dup, "spec.models", f"model names must be unique; repeated: {', '.join(dup)}")
    return SweepSpec(
        name=name.strip(), models=tuple(models), datasets=tuple(datasets), regimes=tuple(regimes),
        seeds=tuple(seeds), description=raw.get("description") or "",
        data_root=raw.get("data_root") or "./data", storage=raw.get("storage") or "./xfer-results",
        tracking_uri=raw.get("tracking_uri"), download=bool(raw.get("download", False)),
        resources={k: dict(v) for k, v in resources.items()}, search=search,
        final=bool(final.get("enabled", True)), max_concurrent=mc, plugins=tuple(plugins), path=path,
        min_free_space=min_free, estimators=estimators)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file; any problem is a SpecError naming the file and key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if raw is None:
        raise SpecError(f"{p}: the file is empty; a sweep file is a mapping with at least name, models, datasets "
                        "and regimes (see sweeps/quickstart.yaml)")
    try:
        return parse_spec(raw, path=str(p))
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None


def plan(spec: SweepSpec) -> dict[str, Any]:
    """Trial counts, for `xfer plan`: ``total`` counts grid cells × grid points, ``distinct`` the trials
    that actually run (model entries share a trial when their regime's identity ignores what differs).
    Counted, not enumerated: a grid is a product, and models differ only in their identity fields, so
    the paper's 30,144 trials need no key hashed."""
    per_cell_regime = {r.name: math.prod(len(v) for v in r.grid.values()) for r in spec.regimes}
    n_data, n_seeds = len(spec.datasets), len(spec.seeds)
    by_regime = {r: len(spec.models) * n_data * n_seeds * n for r, n in per_cell_regime.items()}
    distinct = {}
    for r in spec.regimes:
        rule = REGIMES.get(r.name).key_rule
        identities = {canonical(m.key_fields(rule.model)) for m in spec.models}
        distinct[r.name] = len(identities) * n_data * n_seeds * per_cell_regime[r.name]
    per_model_dataset = n_seeds * sum(per_cell_regime.values())
    by_cell = {f"{m.name} / {d.display}": per_model_dataset for m in spec.models for d in spec.datasets}
    n_cells = len(spec.models) * n_data * n_seeds
    # a cell axis (schedule, training-set size) makes each of its values a cell with its own final trial
    points = {r.name: math.prod(len(r.grid.get(a.name, [a.default])) for a in REGIMES.get(r.name).cell_axes)
              for r in spec.regimes}
    return {
        "sweep": spec.name, "total": sum(by_regime.values()), "distinct": sum(distinct.values()),
        "distinct_by_regime": distinct, "pretrain": len(spec.pretrain_trials()),
        "final": n_cells * sum(points.values()) if spec.final else 0,
        "models": len(spec.models), "datasets": n_data, "seeds": n_seeds,
        "by_regime": by_regime, "per_cell_by_regime": per_cell_regime, "by_model_dataset": by_cell,
        "grids": {r.name: {a: len(v) for a, v in r.grid.items()} for r in spec.regimes},
    }
