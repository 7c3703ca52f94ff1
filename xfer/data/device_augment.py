"""Random-resized crop + horizontal flip + normalisation as batched tensor ops on the trial's device.

Why: per-sample PIL (or per-sample tensor) transforms in DataLoader workers cost more CPU than a small
model's step and starve a GPU; the same augmentation on a batch of uint8 images that are already in
memory (``xfer.data.cache``) is a few tensor ops.

What it computes is torchvision's ``RandomResizedCrop`` (default scale (0.08, 1) and ratio (3/4, 4/3),
10 attempts, then the centre-crop fallback — ``crop_params`` is ``get_params`` vectorised, drawn from an
explicit ``torch.Generator`` so a batch is a function of its seed) + ``RandomHorizontalFlip`` +
``Normalize``; evaluation is resize-short-side-to ``input_size / crop_pct`` + centre crop, expressed as
the equivalent crop box. Both read from the cached image (its long side at most ``S``) instead of the
original file, so the pixels differ slightly from the per-sample path (one more resampling).

Crop boxes become pixels through a resampler chosen per device type (``RESAMPLERS``):

- ``per_sample`` (CPU and anything but CUDA): each box is cut out of its uint8 image and resized with
  torchvision's antialiased resize in the model's interpolation — exactly ``v2.RandomResizedCrop`` on
  the cached image, and fast on CPU (uint8 SIMD kernels).
- ``roi_align`` (CUDA): one ``torchvision.ops.roi_align`` over the whole batch (bilinear, with an
  adaptive number of samples per output pixel averaged — its antialiasing) instead of hundreds of small
  kernel launches. A test checks it against ``per_sample`` on CPU.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from xfer.data.transforms import DataConfig, interpolation_mode
from xfer.registry import Registry

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults: the paper's augmentation
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


# ------------------------------------------------------------------ parameters (CPU, seeded)
def crop_params(sizes: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = SCALE,
                ratio: tuple[float, float] = RATIO) -> torch.Tensor:
    """int64 ``[B, 4]`` (top, left, height, width) random-resized-crop boxes for images of ``sizes``
    ``[B, 2]`` (height, width): torchvision's ``RandomResizedCrop.get_params`` for every row at once —
    up to ``ATTEMPTS`` (area, log-ratio) draws, the first that fits wins, else the centre crop clamped to
    ``ratio``. Rounding is Python's (half to even), as there."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    b = len(sizes)
    h = sizes[:, 0:1].double()
    w = sizes[:, 1:2].double()
    u = torch.rand(b, ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first attempt that fits (0 when none)
    found = ok.gather(1, first).squeeze(1)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # the centre-crop fallback (no attempt fitted)
    hh, ww = h.squeeze(1), w.squeeze(1)
    in_ratio = ww / hh
    fw = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], torch.round(hh * ratio[1]), ww))
    fh = torch.where(in_ratio < ratio[0], torch.round(ww / ratio[0]), hh)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    pos = torch.rand(b, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(pos[:, 0] * (hh - ch + 1)), torch.div(hh - ch, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(pos[:, 1] * (ww - cw + 1)), torch.div(ww - cw, 2, rounding_mode="floor"))
    return torch.stack([top, left, ch, cw], 1).to(torch.int64)


def flip_mask(batch: int, generator: torch.Generator) -> torch.Tensor:
    """bool ``[B]``: which images are mirrored (each with probability ½)."""
    return torch.rand(batch, generator=generator) < 0.5


def centre_boxes(sizes: torch.Tensor, input_size: int, resize_size: int) -> torch.Tensor:
    """float64 ``[B, 4]`` (top, left, height, width): the region that resize-short-side-to-``resize_size``
    + centre-crop-``input_size`` keeps, in the image's own pixels."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    side = sizes.min(dim=1).values * (input_size / resize_size)
    top = (sizes[:, 0] - side) / 2
    left = (sizes[:, 1] - side) / 2
    return torch.stack([top, left, side, side], 1)


# ------------------------------------------------------------------ resamplers (on the device)
Images = Union[torch.Tensor, Sequence[torch.Tensor]]  # uint8 [B, 3, S, S], or B views [3, S, S] (CPU)
Resampler = Callable[[Images, torch.Tensor, int, str, "torch.Tensor | None"], torch.Tensor]
RESAMPLERS: "Registry[Resampler]" = Registry("resampler")
DEVICE_RESAMPLER = {"cuda": "roi_align"}  # device type -> resampler; every other device: per_sample


@RESAMPLERS.register("per_sample")
def resample_per_sample(images: Images, boxes: torch.Tensor, out: int, interpolation: str,
                        flips: torch.Tensor | None = None) -> torch.Tensor:
    """Each box (rounded to whole pixels) cut out, resized to ``out`` with antialiasing and, where
    ``flips``, mirrored; uint8 stays uint8. ``images`` may be a list of per-image views (a CPU trial
    crops straight out of the memory-mapped cache, copying only the crop). Crops go through
    channels-last memory, the layout torch's uint8 resize kernels vectorise over (the same values)."""
    mode = interpolation_mode(interpolation).value  # torch's own name of torchvision's mode
    antialias = mode in ("bilinear", "bicubic")
    cells = torch.round(boxes).to(torch.int64).tolist()
    mirror = [False] * len(cells) if flips is None else flips.tolist()
    crops = []
    for i, (t, l, h, w) in enumerate(cells):
        crop = images[i][None, :, t:t + max(1, h), l:l + max(1, w)].contiguous(memory_format=torch.channels_last)
        y = torch.nn.functional.interpolate(crop, size=(out, out), mode=mode, antialias=antialias,
                                            **({"align_corners": False} if antialias else {}))
        crops.append(y.flip(-1) if mirror[i] else y)
    return torch.cat(crops) if crops else torch.zeros((0, 3, out, out), dtype=torch.uint8)


@RESAMPLERS.register("roi_align")
def resample_roi_align(images: Images, boxes: torch.Tensor, out: int, interpolation: str,
                       flips: torch.Tensor | None = None) -> torch.Tensor:
    """All boxes in one ``roi_align`` (float result, 0..255): bilinear, averaging ``ceil(box/out)``
    samples per output pixel along each axis when shrinking (``sampling_ratio=-1``), pixel centres at
    +½ (``aligned=True``, the convention of ``F.interpolate(align_corners=False)``); then one mirror of
    the ``flips`` rows."""
    from torchvision.ops import roi_align

    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    b = len(images)
    if b == 0:
        return images.new_zeros((0, images.shape[1], out, out), dtype=torch.float32)
    bx = boxes.to(torch.float32)
    rois = torch.stack([torch.arange(b, dtype=torch.float32), bx[:, 1], bx[:, 0], bx[:, 1] + bx[:, 3],
                        bx[:, 0] + bx[:, 2]], 1)
    x = roi_align(images.float(), _to(rois, images.device), (out, out), spatial_scale=1.0, sampling_ratio=-1,
                  aligned=True)
    if flips is None:
        return x
    return torch.where(_to(flips, x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without a host sync: through pinned memory on CUDA (a plain copy
    would wait for the previous step's kernels, idling the GPU while the next batch is launched)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def resampler_for(device: torch.device | str) -> str:
    return DEVICE_RESAMPLER.get(torch.device(device).type, "per_sample")


# ------------------------------------------------------------------ the batch transform
class DeviceAugment:
    """The training and evaluation transforms of one model's preprocessing, on ``device``, for batches of
    uint8 images ``[B, 3, S, S]`` (or, on CPU, B views ``[3, S, S]``) whose content is the top-left
    ``sizes[i]`` of each slot."""

    def __init__(self, cfg: DataConfig, device: torch.device | str, resampler: str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.resampler_name = resampler or resampler_for(self.device)
        self.resample = RESAMPLERS.get(self.resampler_name)
        std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)  # (x/255 - mean)/std as one multiply-add
        self._shift = -mean / std
        self.channels_last = self.device.type == "cuda"

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 (uint8 or float) → float32 normalised, in one conversion and one in-place multiply-add;
        channels-last on CUDA (what its convolutions run fastest on)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt).copy_(x)
        return y.mul_(self._scale).add_(self._shift)

    def train(self, images: Images, sizes: torch.Tensor, generator: torch.Generator,
              keep: slice | None = None) -> torch.Tensor:
        """Random-resized crop + flip + normalise; the random draws come from ``generator`` (CPU) only.
        ``keep``: ``images`` are these rows of the batch whose ``sizes`` are given (one rank's share of a
        data-parallel batch): the draws are the whole batch's, so each image is augmented as in one worker."""
        boxes = crop_params(sizes, generator)
        flips = flip_mask(len(boxes), generator)
        if keep is not None:
            boxes, flips = boxes[keep], flips[keep]
        return self.normalise(self.resample(images, boxes.double(), self.cfg.input_size, self.cfg.interpolation,
                                            flips))

    def eval(self, images: Images, sizes: torch.Tensor) -> torch.Tensor:
        """Resize short side to ``input_size / crop_pct`` + centre crop + normalise (deterministic)."""
        boxes = centre_boxes(sizes, self.cfg.input_size, self.cfg.resize_size)
        return self.normalise(self.resample(images, boxes, self.cfg.input_size, self.cfg.interpolation, None))
