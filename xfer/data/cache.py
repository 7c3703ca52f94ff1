"""Decode once: every image of a dataset pool as one uint8 array, on disk, memory-mapped by every trial.

Why: a fine-tune trial that decodes, crops and collates JPEGs per sample on the CPU spends more time on
its input than on its model, and a sweep decodes the same images again in every trial of its grid. So
each pool (the files of a dataset as they come: its train images, its test images) is decoded once into
``images.npy``: uint8 ``[N, 3, S, S]``, each image resized (antialiased bilinear) so that its long side
is at most ``S`` — aspect ratio kept, never enlarged — placed top-left in its slot, with its size in
``meta.npz`` and the slot's remainder filled by repeating the image's last row and column (so a
bilinear sample at the image's edge reads the edge, as a crop-then-resize would). Trials then gather
batches of rows and augment them on their device (``xfer.data.device_augment``).

``S = cache_side(data_config) = max(2 · input_size, resize_size)``: the evaluation resize (short side
to ``input_size / crop_pct``) always reads an image at least that large, and random-resized crops of a
tenth of the image still have about twice the pixels they are resized to. When every image of a pool
is smaller, ``S`` is the pool's largest long side.

The cache lives at ``StorageLayout.image_cache(key)``, ``key = hash(dataset fingerprint, pool, S,
version)`` — what the images are and the resolution, never where they came from. It is written once:
under a lock (one writer per key; the others wait and then read it) into a temporary folder that is
renamed into place, with the SHA-256 of each file in ``manifest.json``; a reader verifies the files
against it (once per process) and maps the images read-only, so every trial on a node shares one copy
in the page cache. A corrupt or truncated cache is logged, removed and rebuilt.

In-memory pools (``ArrayPool``: synthetic, digits, CIFAR) whose images already fit are used as they
are, without a copy; a split that is not a dataset's own (a ``Subset`` of one is resolved to it) is
decoded in memory per call, the same arrays without the disk.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from xfer.data.splits import Selection
from xfer.data.transforms import DataConfig
from xfer.hashing import stable_hash
from xfer.io import ChecksumError, free_bytes, sha256_file, storage_errno, storage_error

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when the stored format or the decode/resize rule changes: old caches go stale
IMAGES, META, MANIFEST = "images.npy", "meta.npz", "manifest.json"
LOG_EVERY_S = 30.0  # progress line cadence while decoding a large pool


def cache_side(cfg: DataConfig) -> int:
    """The long side ``S`` images are stored at for a model with this preprocessing (module docstring)."""
    return max(2 * cfg.input_size, cfg.resize_size)


def cache_key(identity: str, pool: str, side: int) -> str:
    """The cache folder name of one pool: what the images are (the dataset fingerprint and pool) and S."""
    return stable_hash({"identity": identity, "pool": pool, "side": int(side), "version": CACHE_VERSION}, n=24)


# ------------------------------------------------------------------ the arrays
@dataclass(frozen=True)
class PoolImages:
    """One pool's images: ``images`` uint8 ``[N, 3, S, S]`` (read-only; a memmap when cached on disk),
    ``sizes`` int32 ``[N, 2]`` (height, width of the image in its slot, top-left), ``targets`` as the
    pool gives them (``[N]`` class ids or ``[N, C]`` multi-hot)."""

    images: np.ndarray
    sizes: np.ndarray
    targets: np.ndarray

    @property
    def side(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


class SplitImages:
    """The images of a split as rows of one or more pools; ``gather`` copies a batch of rows out."""

    def __init__(self, pools: Sequence[PoolImages], pool_of: np.ndarray, row_of: np.ndarray) -> None:
        if len(pool_of) != len(row_of):
            raise ValueError(f"{len(pool_of)} pool ids but {len(row_of)} rows")
        self.pools = list(pools)
        self.pool_of = np.asarray(pool_of, dtype=np.int64)
        self.row_of = np.asarray(row_of, dtype=np.int64)
        self.side = max((p.side for p in self.pools), default=0)

    def __len__(self) -> int:
        return len(self.row_of)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "SplitImages":
        idx = np.asarray(indices, dtype=np.int64)
        return SplitImages(self.pools, self.pool_of[idx], self.row_of[idx])

    def _per_pool(self, idx: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(pool number, positions in ``idx``, rows in that pool) for each pool ``idx`` touches."""
        pools = self.pool_of[idx]
        for p in np.unique(pools):
            where = np.flatnonzero(pools == p)
            yield int(p), where, self.row_of[idx[where]]

    def sizes(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), 2), np.int32)
        for p, where, rows in self._per_pool(idx):
            out[where] = self.pools[p].sizes[rows]
        return out

    def targets(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        parts = [(where, self.pools[p].targets[rows]) for p, where, rows in self._per_pool(idx)]
        if len(parts) == 1:
            return parts[0][1]
        first = parts[0][1]
        out = np.empty((len(idx), *first.shape[1:]), first.dtype)
        for where, t in parts:
            out[where] = t
        return out

    def views(self, indices: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
        """The slots of ``indices`` as uint8 ``[3, S, S]`` tensors that are views of the arrays — no copy:
        what a CPU trial crops from directly. Read-only memory: never write to them."""
        idx = np.asarray(indices, dtype=np.int64)
        out: list[torch.Tensor] = [None] * len(idx)  # type: ignore[list-item]
        with warnings.catch_warnings():  # torch warns that it cannot mark a tensor read-only; it is
            warnings.simplefilter("ignore", UserWarning)
            for p, where, rows in self._per_pool(idx):
                images = self.pools[p].images
                for k, r in zip(where.tolist(), rows.tolist()):
                    out[k] = torch.from_numpy(np.asarray(images[r]))
        return out

    def gather(self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[B, 3, side, side]``: the slots of ``indices`` (a pool with smaller slots fills the
        top-left of its rows; the rest of those rows is left as it was — never read, see ``sizes``).
        ``out`` (e.g. a pinned buffer's numpy view) is filled in place."""
        idx = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(idx), 3, self.side, self.side), np.uint8)
        for p, where, rows in self._per_pool(idx):
            images = self.pools[p].images
            if len(where) == len(idx) and images.shape[-1] == self.side:
                np.take(images, rows, axis=0, out=out)  # one pool, one copy (releases the GIL)
            else:
                s = images.shape[-1]
                out[where, :, :s, :s] = images[rows]
        return out


# ------------------------------------------------------------------ decoding
def to_chw_uint8(image: Any) -> torch.Tensor:
    """A dataset item's image (PIL image or uint8 CHW tensor, 1/3/4 channels) as uint8 RGB ``[3, H, W]``."""
    from torchvision.transforms.v2 import functional as F

    x = (F.to_image(image) if not isinstance(image, torch.Tensor) else image).as_subclass(torch.Tensor)
    if x.ndim == 2:
        x = x[None]
    if x.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image, got {x.dtype} (datasets hand out PIL images or uint8 tensors)")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3]
    elif x.shape[0] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got an image of shape {tuple(x.shape)}")
    return x


def fit_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled so that the long side is at most ``side`` (aspect kept, never enlarged)."""
    long = max(h, w)
    if long <= side:
        return h, w
    scale = side / long
    return max(1, round(h * scale)), max(1, round(w * scale))


def fill_slot(slot: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """Write ``image`` [3, h, w] top-left into ``slot`` [3, S, S] and repeat its last column and row into
    the rest (an edge-clamped border: bilinear samples at the edge read the edge, not black)."""
    _, h, w = image.shape
    slot[:, :h, :w] = image
    slot[:, :h, w:] = image[:, :, w - 1:w]
    slot[:, h:, :] = slot[:, h - 1:h, :]
    return h, w


class _Decoded(Dataset):
    """Item ``i`` of ``base`` as a uint8 [3, h, w] array fitted to ``side`` (runs in DataLoader workers)."""

    def __init__(self, base: Dataset, side: int) -> None:
        self.base, self.side = base, side

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        from torchvision.transforms.v2 import functional as F

        image, target = self.base[i]
        x = to_chw_uint8(image)
        h, w = fit_size(int(x.shape[1]), int(x.shape[2]), self.side)
        if (h, w) != tuple(x.shape[1:]):
            x = F.resize(x, [h, w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        return x.contiguous().numpy(), target


def _no_collate(item: Any) -> Any:
    return item


@dataclass
class _Files:
    files: list[str]


def _probe_side(base: Dataset, side: int) -> int:
    """The slot side a pool needs: ``side``, or its largest image's long side when every image is
    smaller. In-memory pools and file lists are probed cheaply (shape / image headers); other datasets
    get ``side``."""
    if isinstance(base, Subset):  # a part of a pool: probe the pool's own (files of those indices)
        inner = base.dataset
        if isinstance(getattr(inner, "files", None), list):
            files = [inner.files[i] for i in base.indices]  # type: ignore[attr-defined]
            return _probe_side(_Files(files), side) if files else side
        return _probe_side(inner, side)
    images = getattr(base, "images", None)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return min(side, max(int(images.shape[-1]), int(images.shape[-2])))
    files = getattr(base, "files", None)
    if isinstance(files, (list, tuple)) and files:
        from PIL import Image

        longest = 0
        for f in files:
            try:
                with Image.open(f) as im:
                    longest = max(longest, *im.size)
            except Exception:  # noqa: BLE001 - a bad file is reported by name when it is decoded
                return side
            if longest >= side:
                return side
        return max(1, longest)
    return side


def _decoded(base: Dataset, side: int, num_workers: int, what: str) -> Iterator[tuple[int, np.ndarray, Any]]:
    """``(i, uint8 [3, h, w] fitted to side, target)`` for every item, decoded by ``num_workers``
    DataLoader workers, with a progress line now and then."""
    n = len(base)  # type: ignore[arg-type]
    loader = DataLoader(_Decoded(base, side), batch_size=None, shuffle=False, num_workers=num_workers,
                        collate_fn=_no_collate)
    t0 = last = time.monotonic()
    for i, (x, target) in enumerate(loader):
        yield i, np.asarray(x), np.asarray(target.numpy() if isinstance(target, torch.Tensor) else target)
        now = time.monotonic()
        if now - last > LOG_EVERY_S:
            log.info("decoding %s: %d/%d images (%.0f/s)", what, i + 1, n, (i + 1) / (now - t0))
            last = now


def _targets(targets: list[np.ndarray]) -> np.ndarray:
    return np.stack(targets) if targets else np.zeros(0, np.int64)


def decode_into(base: Dataset, images: np.ndarray, *, num_workers: int = 0, what: str = "pool") -> PoolImages:
    """Decode every item of ``base`` into ``images`` (uint8 ``[N, 3, S, S]``, e.g. an open memmap) with
    ``num_workers`` DataLoader workers; returns the pool's arrays. A bad image raises the dataset's own
    error (``BadImageError`` naming the file)."""
    sizes = np.zeros((images.shape[0], 2), np.int32)
    targets: list[np.ndarray] = []
    for i, x, target in _decoded(base, images.shape[-1], num_workers, what):
        sizes[i] = fill_slot(images[i], x)
        targets.append(target)
    return PoolImages(images, sizes, _targets(targets))


def decode_in_memory(base: Dataset, side: int, *, num_workers: int = 0) -> PoolImages:
    """A split's arrays without the disk (no dataset identity to key a cache by, or no cache folder):
    slots as large as its largest image (at most ``side``)."""
    items = list(_decoded(base, side, num_workers, "split"))
    slot = max((max(x.shape[1:]) for _, x, _ in items), default=1)
    images = np.empty((len(items), 3, slot, slot), np.uint8)
    sizes = np.array([fill_slot(images[i], x) for i, x, _ in items], np.int32).reshape(-1, 2)
    images.flags.writeable = False
    return PoolImages(images, sizes, _targets([t for _, _, t in items]))


def _as_is(base: Dataset, side: int) -> PoolImages | None:
    """An in-memory uint8 RGB pool of square images that already fit: its own memory, no copy."""
    images = getattr(base, "images", None)
    targets = getattr(base, "targets", None)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and images.shape[1] == 3 and images.shape[2] == images.shape[3] <= side and targets is not None):
        return None
    arr = images.numpy()
    arr = arr.view()
    arr.flags.writeable = False
    sizes = np.full((len(arr), 2), images.shape[2], np.int32)
    return PoolImages(arr, sizes, np.asarray(targets))


# ------------------------------------------------------------------ the disk cache
_VERIFIED: dict[Path, tuple[tuple[int, int, int], PoolImages]] = {}  # opened caches of this process


def clear_memo() -> None:
    """Forget which caches this process has verified (the next open hashes them again)."""
    _VERIFIED.clear()


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_cached(folder: Path) -> PoolImages:
    """The verified, read-only arrays of a cache folder; ``ChecksumError`` if it is incomplete, truncated
    or corrupted (SHA-256 of each file against ``manifest.json``; once per process and file version)."""
    folder = Path(folder)
    images_path = folder / IMAGES
    try:
        sig = _signature(images_path)
        memo = _VERIFIED.get(folder)
        if memo is not None and memo[0] == sig:
            return memo[1]
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("version") != CACHE_VERSION:
            raise ChecksumError(f"{folder} has cache version {manifest.get('version')!r}, not {CACHE_VERSION!r}")
        for name in (IMAGES, META):
            expected = manifest["sha256"][name]
            actual = sha256_file(folder / name)
            if actual != expected:
                raise ChecksumError(f"{folder / name} has SHA-256 {actual[:16]}…, not the {expected[:16]}… "
                                    "recorded when it was written: it is truncated or corrupted")
        images = np.load(images_path, mmap_mode="r")
        with np.load(folder / META) as meta:
            sizes, targets = meta["sizes"], meta["targets"]
        count, side = int(manifest["count"]), int(manifest["side"])
        if images.shape != (count, 3, side, side) or sizes.shape != (count, 2) or len(targets) != count:
            raise ChecksumError(f"{folder}: arrays of shape {images.shape}, {sizes.shape}, {len(targets)} targets "
                                f"do not match the manifest ({count} images of side {side})")
    except ChecksumError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing or unreadable file, bad JSON or header
        raise ChecksumError(f"{folder} is incomplete or unreadable: {type(e).__name__}: {e}") from None
    pool = PoolImages(images, sizes, targets)
    _VERIFIED[folder] = (sig, pool)
    return pool


def _discard_folder(folder: Path) -> None:
    """Move a cache folder aside, then delete it (a process that maps its images keeps its mapping)."""
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.discard")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
    _VERIFIED.pop(folder, None)


class _Lock:
    """An exclusive advisory lock on ``path`` (``flock``); where locking is unsupported, no lock — the
    atomic rename still keeps the cache correct, at worst two writers decode the same pool."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError) as e:
            log.debug("no lock on %s (%s): writing without one", self.path, e)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()  # closing releases the lock


def _write(folder: Path, base: Dataset, side: int, *, num_workers: int, manifest: Mapping[str, Any]) -> None:
    """Decode ``base`` into a temporary folder beside ``folder`` and rename it into place."""
    n = len(base)  # type: ignore[arg-type]
    slot = _probe_side(base, side)
    needed = n * 3 * slot * slot
    free = free_bytes(folder.parent)
    if free is not None and free < needed + (64 << 20):
        raise storage_error(errno.ENOSPC, folder, needed=needed)  # ENOSPC before decoding anything
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        images = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(n, 3, slot, slot))
        t0 = time.monotonic()
        pool = decode_into(base, images, num_workers=num_workers, what=str(folder.name))
        images.flush()
        del images
        with open(tmp / META, "wb") as f:
            np.savez(f, sizes=pool.sizes, targets=pool.targets)
        digests = {}
        for name in (IMAGES, META):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            digests[name] = sha256_file(tmp / name)
        info = {**manifest, "version": CACHE_VERSION, "count": n, "side": slot, "sha256": digests,
                "decode_seconds": round(time.monotonic() - t0, 3)}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(tmp, folder)  # atomic: readers see no folder or the whole one
        log.info("image cache %s: %d images at side %d (%.1f MiB) decoded in %.1f s", folder, n, slot,
                 needed / 2**20, info["decode_seconds"])
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = storage_errno(e, folder.parent) if isinstance(e, OSError) else None
        if code is not None:
            raise storage_error(code, folder) from e
        raise


def cached_pool(base: Dataset, *, identity: str, pool: str, side: int, root: Path,
                num_workers: int = 0) -> PoolImages:
    """One pool's images from the cache under ``root`` (built on first use; rebuilt if corrupt)."""
    folder = Path(root) / cache_key(identity, pool, side)
    if folder.is_dir():
        try:
            return open_cached(folder)
        except ChecksumError as e:
            log.warning("corrupt image cache %s, rebuilding it: %s", folder, e)
    with _Lock(Path(root) / f".{folder.name}.lock"):
        if folder.is_dir():  # another process finished it while we waited, or it is the corrupt one
            try:
                return open_cached(folder)
            except ChecksumError:
                _discard_folder(folder)
        _write(folder, base, side, num_workers=num_workers,
               manifest={"key": folder.name, "identity": identity, "pool": pool, "requested_side": side})
    return open_cached(folder)


# ------------------------------------------------------------------ a split's images
def split_images(split: Dataset, side: int, *, root: Path | None = None, num_workers: int = 0) -> SplitImages:
    """The images of ``split`` at long side ``side`` (see the module docstring for where they come from):
    a dataset's own split with ``root`` → per-pool disk caches; ``Subset`` → its dataset's, restricted."""
    if isinstance(split, Subset):
        return split_images(split.dataset, side, root=root, num_workers=num_workers).subset(split.indices)
    if isinstance(split, Selection):
        pools: dict[str, PoolImages] = {}  # a pool two parts share (train and val of one pool) is read once
        pool_of, row_of = [], []
        for k, part in enumerate(split.parts):
            base = split.pools[part.pool]
            name, rows = part.pool, np.asarray(part.indices)
            if name not in pools:
                arrays = _as_is(base, side)
                if arrays is None and root is not None and split.identity is not None:
                    arrays = cached_pool(base, identity=split.identity, pool=name, side=side, root=root,
                                         num_workers=num_workers)
                if arrays is None:  # no disk cache: decode only the part's own images
                    name, rows = f"{name}#{k}", np.arange(len(rows))
                    arrays = decode_in_memory(Subset(base, part.indices.tolist()), side, num_workers=num_workers)
                pools[name] = arrays
            pool_of.append(np.full(len(rows), list(pools).index(name)))
            row_of.append(rows)
        if not pools:
            return SplitImages([], np.zeros(0, np.int64), np.zeros(0, np.int64))
        return SplitImages(list(pools.values()), np.concatenate(pool_of), np.concatenate(row_of))
    arrays = _as_is(split, side)
    if arrays is None:
        arrays = decode_in_memory(split, side, num_workers=num_workers)
    return SplitImages([arrays], np.zeros(len(arrays), np.int64), np.arange(len(arrays)))
