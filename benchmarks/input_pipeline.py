"""Decode once, augment on the device: the input pipeline against its baselines, each ratio measured in
this process (baseline and pipeline interleaved, best of ``--repeats``, so a shared machine's load hits
both alike).

    PYTHONPATH=. python benchmarks/input_pipeline.py images     # (a) images/s vs ImageFolder + DataLoader
    PYTHONPATH=. python benchmarks/input_pipeline.py finetune   # (b) trial steps/s vs bare forward+backward
    PYTHONPATH=. python benchmarks/input_pipeline.py gpu        # (c) ResNet-50, 224 px, batch 256 on CUDA

(a) A JPEG folder it writes (``--images`` 2,000 images of about 300 x 400) read by torchvision's
    ``ImageFolder`` + ``DataLoader`` (RandomResizedCrop(224) + flip + ToTensor + Normalize, batch 64,
    ``num_workers`` 0 and 2) against the cached pipeline (``engine.PIPELINES["cached"]``: gather from the
    memory-mapped cache + batched crop/flip/normalise, one torch thread as trials run); the cache's build
    time is reported separately. Target: >= 3x.
(b) ``engine.train`` of the quickstart's fine-tune size (test_resnet, 32 px, batch 64, synthetic_near;
    one thread, as trials are pinned) against the same model's forward + backward + SGD step on tensors
    that are ready in memory; both pipelines. Target: cached >= 0.8 of bare.
(c) A fine-tune trial's images/s (``engine.train``, ResNet-50, bf16 autocast, channels-last, images
    decoded once) against bare forward + backward on tensors already on the GPU. Target: >= 0.9.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(run: Callable[[], int]) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process, its threads included) of ``run()``,
    which returns how many items it made. CPU time is the steadier figure on a shared machine; it does
    not see DataLoader worker processes."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = run()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return n / wall, n / cpu


def interleaved(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) rate of each run over ``repeats`` rounds, the runs alternating within each round."""
    best = {k: (0.0, 0.0) for k in runs}
    for r in range(repeats):
        for k, run in runs.items():
            wall, cpu = timed(run)
            best[k] = (max(best[k][0], wall), max(best[k][1], cpu))
            print(f"  round {r + 1} {k:<26} {wall:9.1f}/s wall {cpu:9.1f}/s CPU   ({load()})", flush=True)
    return best


def show(rates: dict[str, tuple[float, float]], unit: str) -> None:
    for k, (wall, cpu) in rates.items():
        print(f"  {k:<32} {wall:9.2f} {unit}/s wall   {cpu:9.2f} {unit}/CPU-s")


# ------------------------------------------------------------------ (a) images/s
def write_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` training JPEGs of about 300 x 400 (sizes vary a little) in ``classes`` folders, plus a tiny
    test split (the folder dataset needs one)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", classes)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(280, 321)), int(rng.integers(380, 421))
            base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth content, a JPEG-like size
            img.save(d / f"{i}.jpg", quality=90)
    return root


def bench_images(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from xfer import engine
    from xfer.contract import RunContext
    from xfer.data import build_dataset
    from xfer.data.transforms import DataConfig

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="xfer-bench-"))
    folder = tmp / "jpegs"
    if not (folder / "train").is_dir():
        t0 = time.perf_counter()
        write_jpegs(folder, args.images)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s to {folder}")
    cfg = DataConfig(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batches = args.batches
    batch = 64

    tv = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
    imagefolder = datasets.ImageFolder(str(folder / "train"), transform=tv)

    def torchvision_run(workers: int) -> Callable[[], int]:
        def run() -> int:
            loader = DataLoader(imagefolder, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
            seen = 0
            for k, (x, _) in enumerate(loader):
                seen += len(x)
                if k + 1 == batches:
                    break
            return seen
        return run

    ds = build_dataset("imagefolder", root=tmp, path=str(folder), verify=False)
    split = ds.split("train")
    ctx = RunContext.local(storage=tmp / "storage", data_root=tmp, device="cpu", num_workers=args.build_workers)
    torch.set_num_threads(1)
    from xfer.data.cache import cache_side, split_images

    built = ctx.layout.image_cache_dir.is_dir()
    t0 = time.perf_counter()
    images = split_images(split, cache_side(cfg), root=ctx.layout.image_cache_dir, num_workers=args.build_workers)
    took = time.perf_counter() - t0
    size = sum(p.images.nbytes for p in images.pools)
    if built:
        print(f"cache of {len(images)} images at side {images.side} ({size / 2**20:.0f} MiB) already built: opened "
              f"and verified (SHA-256) in {took:.1f} s, what each trial process does once")
    else:
        print(f"cache build: {len(images)} images at side {images.side} ({size / 2**20:.0f} MiB) in {took:.1f} s "
              f"({len(images) / took:.0f} images/s, {args.build_workers} decode workers; once per dataset and "
              "size)")

    def cached_run() -> int:
        tc = engine.TrainConfig(steps=batches, batch_size=batch, lr=0.1, seed=int(time.time()))
        return sum(len(x) for x, _ in engine.PIPELINES.get("cached").train(split, cfg, tc, ctx, 0, "cpu"))

    print(f"(a) images/s, 224 px, batch 64, {batches} batches per run, best of {args.repeats} ({load()})")
    rates = interleaved({"ImageFolder, 0 workers": torchvision_run(0), "ImageFolder, 2 workers": torchvision_run(2),
                         "cached, 1 thread": cached_run}, args.repeats)
    show(rates, "images")
    ours, base0, base2 = rates["cached, 1 thread"], rates["ImageFolder, 0 workers"], rates["ImageFolder, 2 workers"]
    print(f"ratio cached / ImageFolder(0 workers) = {ours[0] / base0[0]:.2f}x wall, {ours[1] / base0[1]:.2f}x CPU "
          "(target >= 3x)")
    print(f"ratio cached / ImageFolder(2 workers) = {ours[0] / base2[0]:.2f}x wall (workers' CPU not seen)")
    print(load())


# ------------------------------------------------------------------ (b) fine-tune steps/s on CPU
def bench_finetune(args: argparse.Namespace) -> None:
    import timm

    from xfer import engine
    from xfer.contract import RunContext
    from xfer.data import build_dataset
    from xfer.data.transforms import DataConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="xfer-bench-"))
    ds = build_dataset("synthetic_near", root=tmp)
    split = ds.split("train")
    cfg = DataConfig(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    steps, batch = args.steps, 64
    classes = ds.info.num_classes

    def trial(pipeline: str) -> Callable[[], int]:
        def run() -> int:
            torch.manual_seed(0)
            model = timm.create_model("test_resnet", num_classes=classes)
            ctx = RunContext.local(storage=tmp / "s", data_root=tmp, device="cpu", threads=1)
            tc = engine.TrainConfig(steps=steps, batch_size=batch, lr=0.05, wd=1e-5, checkpoint_every=0,
                                    log_every=50, pipeline=pipeline)
            engine.train(model, split, cfg, tc, ctx)
            return steps
        return run

    def bare() -> int:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=classes)
        opt = engine.make_optimizer(model, lr=0.05, wd=1e-5)
        loss_fn = torch.nn.CrossEntropyLoss()
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, classes, (batch,))
        model.train()
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps

    print(f"(b) fine-tune steps/s, test_resnet 32 px, batch 64, {steps} steps per run, 1 thread, best of "
          f"{args.repeats} ({load()})")
    rates = interleaved({"bare forward+backward": bare, "trial, cached pipeline": trial("cached"),
                         "trial, pil pipeline": trial("pil")}, args.repeats)
    show(rates, "steps")
    b = rates["bare forward+backward"]
    for name in ("cached", "pil"):
        r = rates[f"trial, {name} pipeline"]
        print(f"ratio trial({name}) / bare = {r[0] / b[0]:.2f} wall, {r[1] / b[1]:.2f} CPU"
              + ("   (target >= 0.8)" if name == "cached" else ""))
    print(load())


# ------------------------------------------------------------------ (c) ResNet-50 on a GPU
def bench_gpu(args: argparse.Namespace) -> None:
    import timm

    from xfer import engine
    from xfer.contract import RunContext
    from xfer.data import build_dataset
    from xfer.data.transforms import DataConfig

    if not torch.cuda.is_available():
        print("(c) needs a CUDA device; none here — not measured")
        return
    torch.backends.cudnn.benchmark = True
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="xfer-bench-"))
    folder = tmp / "jpegs"
    if not (folder / "train").is_dir():
        write_jpegs(folder, args.images)
    ds = build_dataset("imagefolder", root=tmp, path=str(folder), verify=False)
    split = ds.split("train")
    cfg = DataConfig(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    steps, batch = args.steps, 256
    ctx = RunContext.local(storage=tmp / "s", data_root=tmp, device="cuda", num_workers=args.build_workers)

    model = timm.create_model("resnet50", num_classes=10)
    engine.train(model, split, cfg, engine.TrainConfig(steps=3, batch_size=batch, lr=0.1, checkpoint_every=0,
                                                       log_every=0), ctx)  # warm-up: the cache, cudnn

    def trial() -> int:
        tc = engine.TrainConfig(steps=steps, batch_size=batch, lr=0.1, checkpoint_every=0, log_every=0)
        torch.cuda.synchronize()
        engine.train(model, split, cfg, tc, ctx)
        torch.cuda.synchronize()
        return steps * batch

    bare_model = engine.for_device(timm.create_model("resnet50", num_classes=10), "cuda")
    opt = engine.make_optimizer(bare_model, lr=0.1, wd=0.0)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(bare_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: cudnn's algorithm search
        step()

    def bare() -> int:
        torch.cuda.synchronize()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return steps * batch

    print(f"(c) ResNet-50, 224 px, batch 256, bf16, channels-last, {steps} steps, {torch.cuda.get_device_name()}")
    rates = interleaved({"bare forward+backward": bare, "fine-tune trial": trial}, args.repeats)
    show(rates, "images")
    print(f"ratio trial / bare = {rates['fine-tune trial'][0] / rates['bare forward+backward'][0]:.2f} wall   "
          "(target >= 0.9)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("images", "finetune", "gpu"))
    ap.add_argument("--images", type=int, default=2000, help="JPEGs to write for (a) and (c)")
    ap.add_argument("--batches", type=int, default=15, help="batches of 64 per run in (a)")
    ap.add_argument("--steps", type=int, default=60, help="steps per run in (b) and (c)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build-workers", type=int, default=2, help="DataLoader workers decoding the cache")
    ap.add_argument("--dir", default=None, help="reuse a folder from an earlier run (JPEGs and cache)")
    args = ap.parse_args()
    {"images": bench_images, "finetune": bench_finetune, "gpu": bench_gpu}[args.what](args)


if __name__ == "__main__":
    main()
