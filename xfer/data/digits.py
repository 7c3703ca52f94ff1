"""scikit-learn's bundled handwritten digits: a small *real* target dataset that needs no download.

1,797 8x8 grey images (values 0..16), upsampled bilinearly to 32x32 and repeated to RGB so every
offline dataset has the same shape. No official split exists: a seeded stratified third is test,
and 20% of the rest is held out as validation.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xfer.data.registry import DATASETS, DatasetEntry
from xfer.data.base import DatasetInfo
from xfer.data.splits import ArrayPool, Part, SplitDataset, stratified_holdout

GENERATOR_VERSION = "1"
INFO = DatasetInfo(name="digits", num_classes=10, metric="top1", val_rule="heldout", offline=True,
                   description="scikit-learn handwritten digits (8x8 upsampled to RGB)")


def digit_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """All digits as uint8 [N, 3, S, S] plus int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, d.target.astype(np.int64)


def build_digits(*, name: str, root: Path, download: bool, image_size: int, test_fraction: float,
                 val_fraction: float, split_seed: int) -> SplitDataset:
    """Offline: ``root`` and ``download`` are unused."""
    for key, v in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < v < 1:
            raise ValueError(f"dataset {name!r} option {key!r} must be in (0, 1), got {v!r}")
    if not 8 <= image_size <= 256:
        raise ValueError(f"dataset {name!r} option 'image_size' must be in [8, 256], got {image_size!r}")
    images, labels = digit_images(image_size)
    rest, test = stratified_holdout(labels, test_fraction, split_seed)
    tr, va = stratified_holdout(labels[rest], val_fraction, split_seed + 1)
    info = replace(INFO, name=name)
    parts = {"train": [Part("all", rest[tr])], "val": [Part("all", rest[va])], "test": [Part("all", test)]}
    identity = {"generator": GENERATOR_VERSION, "image_size": image_size, "test_fraction": test_fraction,
                "val_fraction": val_fraction, "split_seed": split_seed}
    return SplitDataset(info, {"all": ArrayPool(images, labels)}, parts, [str(i) for i in range(10)], identity)


DATASETS.add("digits", DatasetEntry(
    info=INFO,
    options={"image_size": 32, "test_fraction": 1 / 3, "val_fraction": 0.2, "split_seed": 0},
    builder=build_digits, cache=True,
    option_help={"image_size": "side of the upsampled images", "test_fraction": "stratified fraction held out as test",
                 "val_fraction": "fraction of the rest held out as validation", "split_seed": "seed of both splits"},
))
