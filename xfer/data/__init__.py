"""The dataset registry: a name plus options → a ``TransferDataset`` with train/val/trainval/test.

Each family lives in its own module and adds its entries to ``DATASETS``: the paper's twelve
(``vision``, torchvision-backed, plus Birdsnap through ``folder``), user data (``folder``: an image
folder or a CSV manifest) and the offline datasets (``synthetic``, ``digits``). ``xfer datasets``
lists them.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from xfer.data.base import SPLITS, DatasetInfo, TransferDataset
from xfer.registry import Registry

if TYPE_CHECKING:
    from xfer.regimes.base import RunContext
    from xfer.spec import DatasetRef

log = logging.getLogger(__name__)

# builder(name=..., root=..., download=..., **options) -> TransferDataset
Builder = Callable[..., TransferDataset]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were expected; the message says where and how to get them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: what it is (``info``), its options with defaults, and how to build it."""

    info: DatasetInfo
    options: dict[str, Any]
    builder: Builder
    option_help: Mapping[str, str] = field(default_factory=dict)
    cache: bool = False  # in-memory, deterministic data: build once per process and options
    downloadable: bool = False  # torchvision can fetch it (``download: true``)


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


def _same_kind(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entry's defaults overlaid with ``options``; unknown names and wrong types are errors."""
    entry = DATASETS.get(name)
    valid = sorted(entry.options)
    for key, value in options.items():
        if key not in entry.options:
            raise ValueError(f"unknown option {key!r} for dataset {name!r}; valid: {', '.join(valid) or '(none)'}")
        default = entry.options[key]
        if not _same_kind(value, default):
            raise ValueError(f"dataset {name!r} option {key!r}: expected {type(default).__name__} "
                             f"(default {default!r}), got {value!r}")
    out = dict(entry.options)
    out.update({k: float(v) if isinstance(entry.options[k], float) else v for k, v in options.items()})
    return out


def build_dataset(name: str, *, root: Path | str, download: bool = False, **options: Any) -> TransferDataset:
    """Build a registered dataset. ``root`` is where downloadable datasets live (torchvision's
    layout under it); ``download`` lets torchvision fetch missing files (never implied)."""
    entry = DATASETS.get(name)
    opts = resolve_options(name, options)
    key = json.dumps([name, opts], sort_keys=True, default=str)
    if entry.cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    ds = entry.builder(name=name, root=Path(root).expanduser(), download=bool(download), **opts)
    log.info("dataset %s: %s", name, ", ".join(f"{s}={n}" for s, n in ds.counts().items()))
    if entry.cache:
        _CACHE[key] = ds
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return ds


def build_from_ref(ref: "DatasetRef", ctx: "RunContext") -> TransferDataset:
    """Build the dataset a trial names, reading from ``ctx.data_root``; a ``download`` option on the
    reference overrides the run's ``ctx.download``."""
    options = dict(ref.options)
    download = options.pop("download", ctx.download)
    if not isinstance(download, bool):
        raise ValueError(f"dataset {ref.name!r} option 'download': expected true or false, got {download!r}")
    return build_dataset(ref.name, root=ctx.data_root, download=download, **options)


# Each module registers its entries on import (keep these below the definitions they use).
from xfer.data import digits, folder, synthetic, vision  # noqa: E402,F401

__all__ = ["DATASETS", "SPLITS", "DatasetEntry", "DatasetInfo", "DatasetNotFoundError", "TransferDataset",
           "build_dataset", "build_from_ref", "dataset_option_names", "resolve_options"]
