"""A study's plain data: models, dataset references, trials and their stable keys.

``TrialSpec.key`` is a stable hash of everything that changes a trial's result (never of where it runs
or how it is tracked), so a key names the trial's MLflow run, checkpoint folder and cached features,
and reruns skip finished keys. *What* it hashes of the model is the regime's declared identity
(``KeyRule``, carried by the trial): a trial from random initialisation does not hash the weights it
never loads, so the same architecture under several model names is one trial.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from xfer.hashing import stable_hash
from xfer.timm_names import preprocessing

PROTOCOL_VERSION = "1"
# The one rule for every new classification head (applied by xfer.models.load_backbone): weights and
# biases start at zero. The key of every trial that trains a head hashes it, so trials made under
# another head rule are never reused as if they were this protocol's.
HEAD_INIT = "zeros"
WEIGHT_SOURCES = ("hub", "random", "pretrain", "file")


@dataclass(frozen=True)
class KeyRule:
    """What a trial's key hashes: the model fields in ``model`` (of ``ModelSpec.key_fields``), every
    option except ``ignore_options`` (observation cadence: logging more often re-runs nothing),
    ``head_init`` for a regime that trains a new head (None: it trains none, e.g. the linear probe), and
    every hyper-parameter except one at its value in ``hparam_defaults`` (an axis added later whose
    default reproduces the trials that existed before it: they keep their keys)."""

    model: tuple[str, ...] = ("name", "arch", "weights", "input_size")
    ignore_options: tuple[str, ...] = ("checkpoint_every", "eval_every", "log_every")
    head_init: str | None = HEAD_INIT
    hparam_defaults: tuple[tuple[str, float], ...] = ()

    def hashed_hparams(self, hparams: Mapping[str, float]) -> dict[str, float]:
        defaults = dict(self.hparam_defaults)
        return {k: v for k, v in hparams.items() if not (k in defaults and v == defaults[k])}

    def to_dict(self) -> dict[str, Any]:
        return {"model": list(self.model), "ignore_options": list(self.ignore_options), "head_init": self.head_init,
                "hparam_defaults": [list(p) for p in self.hparam_defaults]}

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> "KeyRule":
        if not d:
            return DEFAULT_KEY_RULE
        return KeyRule(model=tuple(d["model"]), ignore_options=tuple(d["ignore_options"]),
                       head_init=d.get("head_init", HEAD_INIT),
                       hparam_defaults=tuple((str(k), float(v)) for k, v in d.get("hparam_defaults", ())))


DEFAULT_KEY_RULE = KeyRule()


@dataclass(frozen=True)
class PretrainSpec:
    """How the pretrain regime makes a model's weights (source training)."""

    dataset: "DatasetRef"
    options: Mapping[str, Any]  # pretrain regime options (steps, batch_size, lr, wd, ...)
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """A backbone and where its weights come from.

    ``arch`` is a timm model name, optionally with a pretrained tag (``resnet50.tv_in1k``).
    ``weights``: ``hub`` (timm's pretrained weights), ``random``, ``pretrain`` (made by the pretrain
    regime from ``pretrain``), or ``file`` (a local state dict at ``weights_file``).
    """

    name: str
    arch: str
    weights: str = "hub"
    weights_file: str | None = None
    pretrain: PretrainSpec | None = None
    source_top1: float | None = None  # overrides the shipped table / the measured value
    input_size: int | None = None  # overrides the pretrained config's input size
    paper_name: str | None = None  # the paper model this entry is named for, for reports
    # other weights run under ``paper_name`` (timm lacks the paper's); None: the shipped table decides
    # (``xfer.source_accuracy.is_stand_in``). Never part of a key: it changes what a row means, not the result.
    stand_in: bool | None = None

    def pretrain_trial(self) -> "TrialSpec":
        if self.pretrain is None:
            raise ValueError(f"model {self.name!r} has no pretrain block")
        src = replace(self, weights="random", pretrain=None, source_top1=None, name=self.name)
        return TrialSpec(model=src, dataset=self.pretrain.dataset, regime="pretrain", hparams={},
                         options=dict(self.pretrain.options), seed=self.pretrain.seed, stage="pretrain")

    def weights_id(self) -> str:
        """What identifies the weights (part of every trial key that uses them)."""
        if self.weights == "pretrain":
            return f"pretrain:{self.pretrain_trial().key}"
        if self.weights == "file":
            p = Path(self.weights_file or "")
            size = p.stat().st_size if p.exists() else -1
            return f"file:{p.resolve()}:{size}"
        return f"{self.weights}:{self.arch}"

    def key_fields(self, names: tuple[str, ...] = ("name", "arch", "weights", "input_size")) -> dict[str, Any]:
        """The model's identity fields a key may hash (a regime's ``KeyRule.model`` picks them):
        ``name``, ``arch`` (with its pretrained tag), ``weights`` (``weights_id``), ``input_size``,
        ``architecture`` (the bare timm name) and ``preprocessing`` (timm's resolved input size, mean,
        std, crop, interpolation). The default set keeps the name: a trial belongs to a model entry."""
        fields: dict[str, Callable[[], Any]] = {
            "name": lambda: self.name, "arch": lambda: self.arch, "weights": self.weights_id,
            "input_size": lambda: self.input_size, "architecture": lambda: self.arch.split(".")[0],
            "preprocessing": lambda: preprocessing(self.arch, self.input_size) or {"input_size": self.input_size},
        }
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ValueError(f"unknown model identity field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        return {n: fields[n]() for n in names}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "ModelSpec":
        d = dict(d)
        if d.get("pretrain"):
            p = dict(d["pretrain"])
            d["pretrain"] = PretrainSpec(dataset=DatasetRef.from_dict(p["dataset"]),
                                         options=dict(p["options"]), seed=p.get("seed", 0))
        return ModelSpec(**d)


@dataclass(frozen=True)
class DatasetRef:
    """A registered dataset name plus its options (``label`` is the display name only)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or self.name

    def key_fields(self) -> dict[str, Any]:
        # download/paths change where data comes from, not what it is
        opts = {k: v for k, v in self.options.items() if k not in ("download",)}
        return {"name": self.name, "options": opts}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "DatasetRef":
        return DatasetRef(name=d["name"], options=dict(d.get("options") or {}), label=d.get("label"))


@dataclass(frozen=True)
class TrialSpec:
    """One run of one regime: the unit Ray schedules and MLflow records."""

    model: ModelSpec
    dataset: DatasetRef
    regime: str
    hparams: Mapping[str, float]  # the grid axes: lr, wd (finetune/scratch), l2 (linear_probe)
    options: Mapping[str, Any]  # the regime's other settings: steps, batch_size, ...
    seed: int = 0
    stage: str = "grid"  # grid | final | pretrain

    key_rule: KeyRule = DEFAULT_KEY_RULE  # what the key hashes: the regime's declared identity

    @property
    def key(self) -> str:
        parts = {
            "model": self.model.key_fields(self.key_rule.model), "dataset": self.dataset.key_fields(),
            "regime": self.regime, "hparams": self.key_rule.hashed_hparams(self.hparams),
            "options": {k: v for k, v in self.options.items() if k not in self.key_rule.ignore_options},
            "seed": self.seed, "stage": self.stage, "protocol": PROTOCOL_VERSION,
        }
        if self.key_rule.head_init is not None:  # absent for head-less regimes: their keys stay as they were
            parts["head_init"] = self.key_rule.head_init
        return stable_hash(parts)

    @property
    def cell(self) -> tuple[str, str, str]:
        """The (model, dataset, regime) cell this trial belongs to (selection is per cell)."""
        return (self.model.name, self.dataset.display, self.regime)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hparams"] = dict(self.hparams)
        d["options"] = dict(self.options)
        d["key_rule"] = self.key_rule.to_dict()
        return d

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> "TrialSpec":
        """Rebuild a trial from a Ray Tune config: ``{"trial": to_dict()}``, where a searcher (Optuna)
        may have put sampled values of the grid axes at the top level (``{"trial": …, "lr": 0.01}``)."""
        if "trial" not in config:
            raise ValueError(f"the Ray trial config has no 'trial' entry (keys: {', '.join(config)}); the sweep "
                             "passes {'trial': TrialSpec.to_dict()}")
        trial = TrialSpec.from_dict(config["trial"])
        sampled = {k: float(config[k]) for k in trial.hparams if k in config}
        return replace(trial, hparams={**trial.hparams, **sampled}) if sampled else trial

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "TrialSpec":
        return TrialSpec(model=ModelSpec.from_dict(d["model"]), dataset=DatasetRef.from_dict(d["dataset"]),
                         regime=d["regime"], hparams=dict(d["hparams"]), options=dict(d["options"]),
                         seed=int(d.get("seed", 0)), stage=d.get("stage", "grid"),
                         key_rule=KeyRule.from_dict(d.get("key_rule")))


