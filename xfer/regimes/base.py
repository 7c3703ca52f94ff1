"""The regime descriptor: one object per regime is the single source of truth for what it takes.

A regime declares its grid **axes** (name, validity rule, how values print, which way selection
breaks ties), its **options** with typed defaults, whether it reads frozen features, its report label,
and its **identity** — which fields of the model enter a trial's key. Spec validation, ``xfer trial``
flags, MLflow params, selection, the results table and the report all read these declarations, so a new
regime (or a new axis) is one module.

Regimes are plain PyTorch: nothing here or in a regime module imports Ray or MLflow, and heavy imports
(torch, timm) happen inside ``run`` so that validating a spec stays cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from xfer.contract import FeatureVariant, RunContext, TrialRecord
from xfer.hashing import stable_hash
from xfer.options import OptionError, check_options, is_number
from xfer.registry import Registry
from xfer.trial import DEFAULT_KEY_RULE, HEAD_INIT, KeyRule

if TYPE_CHECKING:
    from xfer.trial import TrialSpec


@dataclass(frozen=True)
class Axis:
    """One hyper-parameter of a regime's grid.

    ``valid``/``rule`` check a value (and say what is valid); ``prefer`` breaks ties between equally
    good configurations in selection (``smaller`` or ``larger`` wins); ``fmt`` prints a value.

    A ``cell`` axis is a condition of the study, not a hyper-parameter: selection never chooses between
    its values — each value is a cell of its own (e.g. training-set size, schedule length), gets its own
    best configuration and final trial, and the report plots accuracy against it. A cell axis has a
    ``default``: what a sweep that does not name the axis runs, the value the main analysis reads, and
    a value trial keys leave out (so adding the axis re-keys no trial that existed before it).

    A **named** axis (``names``, made by ``Axis.named``) is categorical, e.g. the probe's pooling: a sweep
    file and ``xfer trial`` give names (``pool: [avg, max]``), a trial holds the name's index (so trial
    hparams, the runs table and selection stay numeric, and a default index keys like any cell default),
    and run names, MLflow params and the report show the name. Keeping the value numeric is why this is
    an optional field rather than a second kind of axis: nothing downstream of parsing changes.
    """

    name: str
    help: str
    valid: Callable[[float], bool] = math.isfinite
    rule: str = "a finite number"
    prefer: str = "smaller"
    fmt: str = ".3g"
    cell: bool = False
    default: float | None = None
    names: tuple[str, ...] | None = None  # a categorical axis: value i is names[i]

    @staticmethod
    def named(name: str, help: str, names: tuple[str, ...], default: str, **kw: Any) -> "Axis":
        """A categorical axis over ``names`` (stored as the index; see the class docstring)."""
        return Axis(name, help, valid=lambda v: float(v).is_integer() and 0 <= v < len(names),
                    rule=f"one of {', '.join(names)}", fmt="g", default=float(names.index(default)),
                    names=tuple(names), **kw)

    def __post_init__(self) -> None:
        if self.prefer not in ("smaller", "larger"):
            raise ValueError(f"axis {self.name}: prefer must be 'smaller' or 'larger', got {self.prefer!r}")
        if self.cell and (self.default is None or not self.valid(self.default)):
            raise ValueError(f"axis {self.name}: a cell axis needs a valid default, got {self.default!r}")

    def is_default(self, value: Any) -> bool:
        return self.default is not None and is_number(value) and float(value) == self.default

    def check(self, value: Any, path: str) -> float:
        """The value as the float a trial holds (a named axis: a name or its index → the index)."""
        if self.names and isinstance(value, str) and value in self.names:
            return float(self.names.index(value))
        if not is_number(value) or not self.valid(float(value)):
            raise OptionError(f"{path}: {self.name} must be {self.rule}, got {value!r}")
        return float(value)

    def label(self, value: float) -> str:
        """How a value prints: its name on a named axis, else the number in ``fmt``."""
        if self.names and is_number(value) and self.valid(float(value)):
            return self.names[int(value)]
        return f"{value:{self.fmt}}"

    def param(self, value: float) -> Any:
        """The value as an MLflow param records it (a name, readable; ``parse`` reads it back)."""
        return self.label(value) if self.names else value

    def parse(self, raw: Any) -> float:
        """A recorded param back to the trial's value (NaN when absent or unreadable)."""
        if self.names and raw in self.names:
            return float(self.names.index(raw))
        try:
            return float(raw)
        except (TypeError, ValueError):
            return math.nan

    def format(self, value: float) -> str:
        return f"{self.name}={self.label(value)}"

    def rank(self, value: float) -> float:
        """Sort key where smaller is preferred (NaN last)."""
        if value is None or math.isnan(value):
            return math.inf
        return value if self.prefer == "smaller" else -value


@dataclass(frozen=True)
class Option:
    """A regime setting that is not a grid axis. ``affects_result=False`` options (logging and
    checkpoint cadence) stay out of trial keys, so observing a study more closely never re-runs it."""

    name: str
    default: Any
    help: str = ""
    affects_result: bool = True
    minimum: float | None = None
    maximum: float | None = None  # exclusive: a probability such as dropout must stay below 1
    choices: tuple[Any, ...] | None = None  # the only valid values, when the option is one of a few named settings


class Regime:
    """Base class of every regime; subclasses set the class attributes and implement ``run``."""

    name: str = ""
    label: str = ""  # how reports name it
    axes: tuple[Axis, ...] = ()
    options: tuple[Option, ...] = ()
    uses_features: bool = False  # reads the feature store (the sweep fills it before the grid)
    grid: bool = True  # False: not a grid regime (pretrain runs from a model's `pretrain:` block)
    model_identity: tuple[str, ...] = DEFAULT_KEY_RULE.model  # model fields its trial key hashes
    new_head: bool = True  # trains a new classification head: its keys hash the head rule (trial.HEAD_INIT)
    # an axis whose grid values the regime solves together in one task (``run_path``), e.g. the probe's λ
    path_axis: str | None = None
    # trains for a known number of steps (``budget``) and reports validation during grid trials when its
    # ``eval_every`` option is > 0: what ASHA early stopping (``search: {type: asha}``) needs to stop it
    early_stopping: bool = False

    def budget(self, trial: "TrialSpec") -> int:
        """The training steps ``trial`` runs to the end (ASHA's ``max_t``). Only early-stopping regimes."""
        raise NotImplementedError(f"regime {self.name!r} does not train in steps: ASHA cannot stop it early")

    # -- declarations, derived --------------------------------------------------------------------
    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def cell_axes(self) -> tuple[Axis, ...]:
        """The axes whose values are cells of their own (never selected away; see ``Axis``)."""
        return tuple(a for a in self.axes if a.cell)

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"regime {self.name!r} has no axis {name!r}; its axes: {', '.join(self.axis_names) or 'none'}")

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    @property
    def key_rule(self) -> KeyRule:
        return KeyRule(model=tuple(self.model_identity),
                       ignore_options=tuple(sorted(o.name for o in self.options if not o.affects_result)),
                       head_init=HEAD_INIT if self.new_head else None,
                       hparam_defaults=tuple((a.name, float(a.default)) for a in self.cell_axes))

    def check_options(self, raw: Mapping[str, Any], path: str) -> dict[str, Any]:
        """The defaults overlaid with ``raw``; unknown names, wrong kinds, values outside an option's
        [minimum, maximum) and values not among its choices are OptionErrors naming ``path``."""
        out = check_options(raw, self.defaults, path)
        for o in self.options:
            if o.minimum is not None and is_number(out[o.name]) and out[o.name] < o.minimum:
                raise OptionError(f"{path}.{o.name}: must be >= {o.minimum:g}, got {out[o.name]!r}")
            if o.maximum is not None and is_number(out[o.name]) and out[o.name] >= o.maximum:
                raise OptionError(f"{path}.{o.name}: must be below {o.maximum:g}, got {out[o.name]!r}")
            if o.choices and out[o.name] not in o.choices:
                raise OptionError(f"{path}.{o.name}: must be one of {', '.join(map(str, o.choices))}, "
                                  f"got {out[o.name]!r}")
        return out

    def check_hparams(self, hparams: Mapping[str, Any], path: str) -> dict[str, float]:
        """Exactly this regime's axes, each valid; a cell axis that is not given takes its default."""
        extra = sorted(set(hparams) - set(self.axis_names))
        missing = [a.name for a in self.axes if a.name not in hparams and a.default is None]
        if extra or missing:
            raise OptionError(f"{path}: regime {self.name!r} takes the hyper-parameters "
                              f"{', '.join(self.axis_names) or '(none)'}; got {', '.join(sorted(hparams)) or 'none'}")
        return {a.name: a.check(hparams.get(a.name, a.default), f"{path}.{a.name}") for a in self.axes}

    def describe(self, hparams: Mapping[str, float]) -> str:
        """``lr=0.01 wd=1e-05`` (+ a cell axis when it is not at its default: ``schedule=2``)."""
        return " ".join(self.axis(k).format(v) for k, v in hparams.items()
                        if k in self.axis_names and not self.axis(k).is_default(v))

    def feature_variant(self, trial: "TrialSpec") -> FeatureVariant:
        """Which stored features a ``uses_features`` regime reads for ``trial`` (the sweep's features stage
        fills them first): the protocol's own, unless the regime declares feature axes."""
        return FeatureVariant()

    # -- behaviour --------------------------------------------------------------------------------
    def run(self, trial: "TrialSpec", ctx: RunContext) -> TrialRecord:
        raise NotImplementedError

    def run_path(self, trials: "list[TrialSpec]", ctx: RunContext) -> list[TrialRecord]:
        """Trials that differ only in ``path_axis``, solved together; one record per trial, in order.
        Only regimes that declare ``path_axis`` implement it."""
        raise NotImplementedError(f"regime {self.name!r} declares no path axis")

    def path_group(self, trial: "TrialSpec") -> str | None:
        """Trials with the same group can be solved as one path (None: this regime never batches)."""
        if self.path_axis is None:
            return None
        d = trial.to_dict()
        d["hparams"] = {k: v for k, v in d["hparams"].items() if k != self.path_axis}
        return stable_hash(d)


# name -> Regime instance; each regime module adds itself
REGIMES: "Registry[Regime]" = Registry("regime")


def positive(v: float) -> bool:
    return v > 0


def non_negative(v: float) -> bool:
    return v >= 0


# shared by every regime that trains on the target (fine-tune, scratch, the probe): for one seed, each
# trains on the same images (``xfer.data.subset``: one draw per split's labels and seed)
TRAIN_SIZE = Axis("train_size", "training images per class: a class-balanced subset of the training split, "
                  "drawn per seed (0: all of it)", valid=lambda v: v >= 0 and float(v).is_integer(),
                  rule="an integer >= 0 (images per class; 0: the whole training split)", prefer="larger",
                  fmt="g", cell=True, default=0.0)
