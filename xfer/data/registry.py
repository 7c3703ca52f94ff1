"""The dataset registry: a name plus options → a ``TransferDataset`` with train/val/trainval/test.

Only the table and how to build from it; the families (``xfer.data.vision``, ``folder``,
``synthetic``, ``digits``) add their entries when ``xfer.data`` is imported.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from xfer.data.base import DatasetInfo, TransferDataset
from xfer.options import OptionError, check_options
from xfer.registry import Registry

if TYPE_CHECKING:
    from xfer.trial import DatasetRef

log = logging.getLogger(__name__)


# builder(name=..., root=..., download=..., **options) -> TransferDataset
Builder = Callable[..., TransferDataset]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were expected; the message says where and how to get them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


@dataclass(frozen=True)
class PaperSplits:
    """A dataset's size as the transfer study publishes it (Kornblith et al. 2019, Table A1), shipped
    so ``xfer datasets`` can show it and a build at the default options can be checked against it.

    ``trainval`` is the published training size, which includes the validation images: held-out
    validation comes out of it, and an official validation split (``val``, else ``None``) is part of it.
    """

    classes: int
    trainval: int
    test: int
    val: int | None = None

    def __post_init__(self) -> None:
        if self.val is not None and not 0 < self.val < self.trainval:
            raise ValueError(f"official val size {self.val} must lie in (0, trainval={self.trainval})")

    @property
    def train(self) -> int | None:
        """Images of the official train split (None where validation is held out by a rule)."""
        return None if self.val is None else self.trainval - self.val

    def mismatches(self, classes: int, counts: Mapping[str, int]) -> list[str]:
        """What a built dataset has that differs from the published sizes (empty when all agree)."""
        want = {"classes": self.classes, "train+val": self.trainval, "test": self.test}
        got = {"classes": classes, "train+val": counts.get("trainval"), "test": counts.get("test")}
        if self.val is not None:
            want["val"], got["val"] = self.val, counts.get("val")
        return [f"{k} {got[k]} (published: {want[k]})" for k in want if got[k] != want[k]]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: what it is (``info``), its options with defaults, and how to build it."""

    info: DatasetInfo
    options: dict[str, Any]
    builder: Builder
    option_help: Mapping[str, str] = field(default_factory=dict)
    cache: bool = False  # in-memory, deterministic data: build once per process and options
    downloadable: bool = False  # torchvision can fetch it (``download: true``)
    paper: PaperSplits | None = None  # the published class count and split sizes, where there are some
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # options with a closed set of values
    # the option that measures the task's distance from its source task, where the family controls one
    # (the synthetic family's ``distance``); the report's factors-of-transferability view plots against it
    distance_option: str | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset")

_CACHE: "OrderedDict[str, TransferDataset]" = OrderedDict()
_CACHE_SIZE = 8


def dataset_option_names(name: str) -> set[str]:
    """Option names a sweep may give a dataset (``download`` too, for datasets that can download)."""
    entry = DATASETS.get(name)
    names = set(entry.options)
    if entry.downloadable:
        names.add("download")
    return names


def resolve_options(name: str, options: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
    """The entry's defaults overlaid with ``options`` (``download`` too, where the dataset can
    download); unknown names, values of the wrong kind and values outside an option's ``choices`` are
    ``OptionError``s (``xfer.options``)."""
    entry = DATASETS.get(name)
    defaults = dict(entry.options)
    if entry.downloadable:
        defaults.setdefault("download", False)
    path = path or f"dataset {name!r} option"
    for key, valid in entry.choices.items():  # before the type check, so the error lists the values
        if key in options and not any(options[key] == v and type(options[key]) is type(v) for v in valid):
            raise OptionError(f"{path}.{key}: {options[key]!r} is not one of {', '.join(map(str, valid))}")
    out = check_options(options, defaults, path)
    if not entry.downloadable or "download" not in options:
        out.pop("download", None)
    return out


def source_distance(ref: "DatasetRef") -> float | None:
    """The dataset's distance from its source task (its family's ``distance_option``, defaults filled in);
    None when the family measures none (a natural dataset's distance from ImageNet is not known here)."""
    entry = DATASETS.get(ref.name)
    if entry.distance_option is None:
        return None
    return float(resolve_options(ref.name, ref.options)[entry.distance_option])


def build_dataset(name: str, *, root: Path | str, download: bool = False, **options: Any) -> TransferDataset:
    """Build a registered dataset. ``root`` is where downloadable datasets live (torchvision's
    layout under it); ``download`` lets torchvision fetch missing files (never implied)."""
    entry = DATASETS.get(name)
    opts = resolve_options(name, options)
    opts.pop("download", None)
    key = json.dumps([name, opts], sort_keys=True, default=str)
    if entry.cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ds = entry.builder(name=name, root=Path(root).expanduser(), download=bool(download), **opts)
    log.info("dataset %s: %s", name, ", ".join(f"{s}={n}" for s, n in ds.counts().items()))
    if entry.paper is not None and opts == entry.options:  # other options change the sizes on purpose
        off = entry.paper.mismatches(ds.info.num_classes, ds.counts())
        if off:
            log.warning("dataset %s under %s differs from its published size: %s; is the data complete and "
                        "the official copy?", name, root, ", ".join(off))
    if entry.cache:
        _CACHE[key] = ds
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return ds


def build_from_ref(ref: "DatasetRef", *, data_root: Path | str, download: bool = False) -> TransferDataset:
    """Build the dataset a trial names, reading from ``data_root``; a ``download`` option on the
    reference overrides the run's ``download``."""
    options = dict(resolve_options(ref.name, ref.options))
    download = options.pop("download", download)
    return build_dataset(ref.name, root=data_root, download=download, **options)


