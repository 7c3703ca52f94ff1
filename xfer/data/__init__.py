"""Datasets: the registry (``xfer.data.registry``) and the families that fill it.

Each family lives in its own module and adds its entries to ``DATASETS``: the paper's twelve
(``vision``, torchvision-backed, plus Birdsnap through ``folder``), user data (``folder``: an image
folder or a CSV manifest) and the offline datasets (``synthetic``, ``digits``). ``xfer datasets``
lists them. A new family is one module plus its line below.
"""
from __future__ import annotations

from xfer.data.base import SPLITS, DatasetInfo, TransferDataset
from xfer.data.registry import (DATASETS, DatasetEntry, DatasetNotFoundError, build_dataset, build_from_ref,
                                dataset_option_names, resolve_options, source_distance)
from xfer.data import digits, folder, synthetic, vision  # noqa: E402,F401  (they register themselves)

__all__ = ["DATASETS", "SPLITS", "DatasetEntry", "DatasetInfo", "DatasetNotFoundError", "TransferDataset",
           "build_dataset", "build_from_ref", "dataset_option_names", "resolve_options",
           "source_distance"]
