"""Preprocessing derived from a backbone's data config (timm's ``resolve_model_data_config``).

Training uses the paper's augmentation only — random-resized crop + horizontal flip — so any
difference between models comes from the models, not from an augmentation recipe. Evaluation is
timm's: resize the short side to ``input_size / crop_pct``, centre crop ``input_size``. Both accept a
PIL image or a uint8 CHW tensor and return a normalised float32 CHW tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Any, Callable

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

# the modes torchvision supports on tensors (images become tensors before resizing, whatever came in)
INTERPOLATIONS = {m.value: m for m in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT,
                                       InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)}


@dataclass(frozen=True)
class DataConfig:
    """Input size, normalisation and resize rule of a backbone (timm's pretrained config, as data)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean!r} and {self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        interpolation_mode(self.interpolation)

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop (timm: floor(input_size / crop_pct))."""
        return int(math.floor(self.input_size / self.crop_pct))


def interpolation_mode(name: str) -> InterpolationMode:
    """A timm/torchvision interpolation name ("bilinear", "bicubic", ...) as an InterpolationMode."""
    try:
        return INTERPOLATIONS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; valid: {', '.join(INTERPOLATIONS)}") from None


def _to_float(cfg: DataConfig) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
            v2.ToPureTensor()]


def train_transform(cfg: DataConfig) -> v2.Compose:
    """Random-resized crop (torchvision's default scale/ratio) + horizontal flip + normalise."""
    mode = interpolation_mode(cfg.interpolation)
    return v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.RandomResizedCrop(cfg.input_size, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        *_to_float(cfg),
    ])


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Resize the short side to ``input_size / crop_pct``, centre crop, normalise (deterministic)."""
    mode = interpolation_mode(cfg.interpolation)
    return v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.Resize(cfg.resize_size, interpolation=mode, antialias=True),
        v2.CenterCrop(cfg.input_size),
        *_to_float(cfg),
    ])


class Transformed(Dataset):
    """A split with a transform applied to each image (targets pass through; batches collate)."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.base[index]
        return self.transform(image), target
