"""Batched augmentation on the device (xfer/data/device_augment.py): torchvision's random-resized-crop
distribution, determinism per generator seed, flip, normalisation, the evaluation crop, and the CUDA
resampler (roi_align) checked against the per-sample one on CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.transforms import v2

from xfer.data import device_augment as A
from xfer.data.transforms import DataConfig, eval_transform

CFG = DataConfig(input_size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_pct=0.8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(b: int, side: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure at several scales (upsampled noise), so resamplers can be compared."""
    g = _gen(seed)
    coarse = torch.rand(b, 3, side // 4, side // 4, generator=g) * 255
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False).round().to(torch.uint8)


def test_crop_boxes_lie_inside_and_follow_the_scale_and_ratio_ranges():
    g = _gen(0)
    sizes = torch.stack([torch.randint(8, 300, (2000,), generator=g), torch.randint(8, 300, (2000,), generator=g)], 1)
    boxes = A.crop_params(sizes, _gen(1))
    top, left, h, w = boxes.T
    H, W = sizes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    area = (h * w).double() / (H * W).double()
    # rounding to whole pixels moves small images' boxes a little outside the nominal ranges
    big = (H >= 100) & (W >= 100)
    assert area[big].min() >= 0.08 * 0.9 and area.max() <= 1.0
    ratio = (w.double() / h.double())[big]
    assert ratio.min() >= 0.75 * 0.95 and ratio.max() <= 4 / 3 * 1.05


def test_crop_boxes_match_torchvisions_distribution():
    """Same image size, 3000 boxes each: area fraction, log aspect and centre position come from the same
    distributions as RandomResizedCrop.get_params (two-sample Kolmogorov-Smirnov, fixed seeds)."""
    H, W, n = 300, 400, 3000
    ours = A.crop_params(torch.tensor([[H, W]] * n), _gen(2)).double()
    torch.manual_seed(3)
    img = torch.zeros(3, H, W)
    theirs = torch.tensor([v2.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)]).double()  # type: ignore[attr-defined]
    for name, f in {"area": lambda b: b[:, 2] * b[:, 3] / (H * W),
                    "log aspect": lambda b: torch.log(b[:, 3] / b[:, 2]),
                    "centre y": lambda b: (b[:, 0] + b[:, 2] / 2) / H,
                    "centre x": lambda b: (b[:, 1] + b[:, 3] / 2) / W}.items():
        p = stats.ks_2samp(f(ours).numpy(), f(theirs).numpy()).pvalue
        assert p > 0.001, f"{name}: p = {p:.2g}"


def test_the_centre_crop_fallback_is_torchvisions():
    """A 4 x 100 image: no attempt can fit (every box needs height >= 4 at ratio <= 4/3), so the centre
    crop clamped to the largest ratio is used, as in torchvision."""
    sizes = torch.tensor([[4, 100], [100, 4]])
    boxes = A.crop_params(sizes, _gen(0))
    img = torch.zeros(3, 4, 100)
    assert boxes[0].tolist() == list(v2.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]))
    assert boxes[0].tolist() == [0, 47, 4, 5] and boxes[1].tolist() == [47, 0, 5, 4]


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    images = _smooth_images(6, 32)
    sizes = torch.tensor([[32, 32], [20, 32], [32, 12], [32, 32], [9, 9], [32, 30]])
    aug = A.DeviceAugment(CFG, "cpu")
    a = aug.train(images, sizes, _gen(7))
    b = aug.train(images, sizes, _gen(7))
    c = aug.train(images, sizes, _gen(8))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_exactly_the_drawn_images():
    images = _smooth_images(16, 24)
    sizes = torch.full((16, 2), 24)
    aug = A.DeviceAugment(CFG, "cpu")
    out = aug.train(images, sizes, _gen(5))
    g = _gen(5)  # replay the draws: boxes, then flips
    boxes = A.crop_params(sizes, g)
    flips = A.flip_mask(16, g)
    plain = aug.normalise(A.resample_per_sample(images, boxes.double(), 16, CFG.interpolation))
    assert 0 < int(flips.sum()) < 16
    for i in range(16):
        assert torch.equal(out[i], plain[i].flip(-1) if flips[i] else plain[i])
    # the CUDA resampler mirrors the same rows
    a = A.resample_roi_align(images, boxes.double(), 16, "bilinear", flips)
    b = A.resample_roi_align(images, boxes.double(), 16, "bilinear")
    for i in range(16):
        assert torch.equal(a[i], b[i].flip(-1) if flips[i] else b[i])


def test_normalisation_is_torchvisions():
    value = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 20, 20).contiguous()
    out = A.DeviceAugment(CFG, "cpu").eval(value, torch.tensor([[20, 20], [20, 14]]))
    want = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(CFG.mean)) / torch.tensor(CFG.std)
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_evaluation_is_resize_then_centre_crop():
    """The eval box equals torchvision's eval_transform on the same image, up to whole-pixel rounding of
    the box (a fraction of a grey level on smooth images)."""
    images = _smooth_images(3, 48, seed=1)
    sizes = torch.tensor([[48, 48], [30, 48], [48, 40]])
    aug = A.DeviceAugment(CFG, "cpu")
    ours = aug.eval(images, sizes)
    ref = torch.stack([eval_transform(CFG)(images[i, :, :h, :w]) for i, (h, w) in enumerate(sizes.tolist())])
    assert ours.shape == ref.shape == (3, 3, 16, 16)
    gap = (ours - ref).abs().mean() * 255 * min(CFG.std)  # in grey levels
    assert gap < 3.0, gap
    box = A.centre_boxes(torch.tensor([[30, 48]]), 16, 20)[0].tolist()
    assert box == pytest.approx([3.0, 12.0, 24.0, 24.0])


def test_roi_align_resampler_agrees_with_per_sample():
    """The CUDA resampler (one roi_align over the batch), run on CPU, against the per-sample antialiased
    resize on the same boxes: shrinking and enlarging crops alike."""
    images = _smooth_images(32, 64, seed=4)
    sizes = torch.tensor([[64, 64], [64, 40], [30, 64], [64, 64]] * 8)
    boxes = A.crop_params(sizes, _gen(9)).double()
    for out in (16, 48):  # mostly shrinking / mostly enlarging
        a = A.resample_roi_align(images, boxes, out, "bilinear")
        b = A.resample_per_sample(images, boxes, out, "bilinear").float()
        err = (a - b).abs().mean().item()
        assert err < 4.0, (out, err)  # grey levels, of 255
        assert abs(a.mean().item() - b.mean().item()) < 0.5


def test_the_resampler_follows_the_device_type():
    assert A.resampler_for("cpu") == "per_sample" and A.resampler_for("cuda:0") == "roi_align"
    assert A.DeviceAugment(CFG, "cpu", resampler="roi_align").resampler_name == "roi_align"
    with pytest.raises(KeyError, match="per_sample"):
        A.DeviceAugment(CFG, "cpu", resampler="nope")


def test_per_sample_crop_is_torchvisions_resized_crop():
    """On whole-pixel boxes the CPU resampler is exactly v2's resized crop of the stored image."""
    images = _smooth_images(4, 40)
    boxes = torch.tensor([[0, 0, 40, 40], [3, 5, 20, 30], [10, 0, 12, 9], [1, 1, 39, 39]])
    out = A.resample_per_sample(images, boxes.double(), 16, "bicubic")
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = v2.functional.resized_crop(images[i], t, l, h, w, [16, 16],
                                         interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(out[i], ref)
    assert math.isclose(float(out.float().mean()), float(images.float().mean()), rel_tol=0.1)
