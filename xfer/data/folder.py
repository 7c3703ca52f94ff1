"""User data on disk: an image folder or a CSV manifest (also how Birdsnap is read).

Folder form (``path``)::

    path/train/<class>/*.jpg      required
    path/val/<class>/*.jpg        optional: an official validation split; without it 20% of train
                                  (seeded, stratified) is held out
    path/test/<class>/*.jpg       required

Manifest form (``manifest``): a CSV file with columns ``path,label,split`` (split is train, val or
test; relative paths are relative to the CSV's folder). Class indices follow the sorted labels
(numerically when every label is an integer).

Unreadable images are caught twice: at build time every file's header is opened (cheap, ``verify``
option) so a wrong or non-image file fails before any training starts, naming the file; and on load
a file that decodes badly (e.g. truncated) raises ``ImageReadError`` naming it, instead of a PIL
traceback from inside a DataLoader worker.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from xfer.data.registry import DATASETS, DatasetEntry, DatasetNotFoundError
from xfer.data.base import DatasetInfo
from xfer.data.splits import Part, SplitDataset, heldout_parts

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST_SPLITS = ("train", "val", "test")
FOLDER_METRICS = ("top1", "mean_per_class")


class ImageReadError(OSError):
    """An image file that is missing, not an image, or corrupt; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully as RGB, or raise ``ImageReadError`` naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e} (the file is corrupt or not an image; "
                             "replace or remove it)") from None


def check_header(path: str | Path) -> None:
    """Open only the header (no decode): catches non-image and empty files cheaply at build time."""
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - identifying the format and size is the check
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e} (not a readable image; replace or remove it, "
                             "or set `verify: false` to skip this check)") from None


class FileImages(Dataset):
    """A list of image files with one target each; items are ``(PIL RGB image, target)``."""

    def __init__(self, files: Sequence[str | Path], targets: Sequence[int] | np.ndarray) -> None:
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.files = [str(f) for f in files]
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.files[i]), int(self.targets[i])


def _sort_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _listing_hash(rows: Sequence[tuple[str, str, str, int]]) -> str:
    """Hash of (split, relative path, label, file size): the folder can move without changing it."""
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update("\t".join(map(str, row)).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _resolve(p: str, root: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else root / path


def _scan_folder(base: Path) -> list[tuple[str, Path, str]]:
    """(split, file, class) for every image under base/{train,val,test}/<class>/."""
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist (expected {base}/train/<class>/*.jpg "
                                   f"and {base}/test/<class>/*.jpg)")
    found = {p.name for p in base.iterdir() if p.is_dir()}
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        raise DatasetNotFoundError(f"image folder {base} has no {' or '.join(missing)}/ folder (found: "
                                   f"{', '.join(sorted(found)) or 'nothing'}); expected train/<class>/, "
                                   "test/<class>/ and optionally val/<class>/")
    rows: list[tuple[str, Path, str]] = []
    for split in MANIFEST_SPLITS:
        sdir = base / split
        if not sdir.is_dir():
            continue
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            files = sorted(f for f in cdir.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {cdir} has no images (extensions: {', '.join(IMG_EXTENSIONS)})")
            rows.extend((split, f, cdir.name) for f in files)
        if not any(r[0] == split for r in rows):
            raise ValueError(f"{sdir} has no class folders with images (expected {sdir}/<class>/*.jpg)")
    return rows


def _read_manifest(manifest: Path) -> list[tuple[str, Path, str]]:
    if not manifest.is_file():
        raise DatasetNotFoundError(f"manifest {manifest} does not exist (a CSV file with columns path,label,split)")
    rows: list[tuple[str, Path, str]] = []
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        need = [c for c in ("path", "label", "split") if c not in cols]
        if need:
            raise ValueError(f"manifest {manifest}: missing column(s) {', '.join(need)}; "
                             f"the header must name path,label,split (found: {', '.join(cols) or 'no header'})")
        for line, rec in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
            split = rec["split"].lower()
            if split not in MANIFEST_SPLITS:
                raise ValueError(f"manifest {manifest} line {line}: split {rec['split']!r} is not one of "
                                 f"{', '.join(MANIFEST_SPLITS)}")
            if not rec["path"] or not rec["label"]:
                raise ValueError(f"manifest {manifest} line {line}: empty path or label")
            rows.append((split, _resolve(rec["path"], manifest.parent), rec["label"]))
    if not rows:
        raise ValueError(f"manifest {manifest} lists no images")
    return rows


def _from_rows(name: str, info: DatasetInfo, rows: list[tuple[str, Path, str]], base: Path, *,
               val_fraction: float, split_seed: int, verify: bool, source: str) -> SplitDataset:
    by_split = {s: [r for r in rows if r[0] == s] for s in MANIFEST_SPLITS}
    for s in ("train", "test"):
        if not by_split[s]:
            raise ValueError(f"{source}: no {s} images")
    classes = _sort_labels({r[2] for r in by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    for s in ("val", "test"):
        unknown = sorted({r[2] for r in by_split[s]} - set(index))
        if unknown:
            raise ValueError(f"{source}: {s} has classes with no training images: {', '.join(unknown[:10])}")
    seen: dict[Path, str] = {}
    for split, path, _ in rows:
        if path in seen:
            raise ValueError(f"{source}: {path} is listed twice ({seen[path]} and {split}); "
                             "an image may belong to one split only")
        seen[path] = split
    listing = []
    for split, path, label in rows:
        if verify:
            check_header(path)
        elif not path.is_file():
            raise ImageReadError(f"image file not found: {path}")
        rel = path.relative_to(base) if path.is_relative_to(base) else path.name
        listing.append((split, str(rel), label, path.stat().st_size))
    pools = {s: FileImages([r[1] for r in by_split[s]], [index[r[2]] for r in by_split[s]])
             for s in MANIFEST_SPLITS if by_split[s]}
    official_val = "val" in pools
    if official_val:
        train, val = Part("train", np.arange(len(pools["train"]))), Part("val", np.arange(len(pools["val"])))
        rule: dict[str, Any] = {"val": "official"}
    else:
        train, val = heldout_parts(pools["train"].targets, val_fraction, split_seed)
        rule = {"val": "heldout", "fraction": val_fraction, "seed": split_seed}
    info = DatasetInfo(name=name, num_classes=len(classes), metric=info.metric,
                       val_rule="official" if official_val else "heldout", multilabel=False,
                       offline=info.offline, description=info.description)
    test = Part("test", np.arange(len(pools["test"])))
    return SplitDataset(info, pools, {"train": [train], "val": [val], "test": [test]}, classes,
                        identity={"files": _listing_hash(listing), "split": rule})


def _check_fraction(name: str, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"dataset {name!r} option 'val_fraction' must be in (0, 1), got {val_fraction!r}")


def build_imagefolder(*, name: str, root: Path, download: bool, path: str | None, manifest: str | None,
                      metric: str, val_fraction: float, split_seed: int, verify: bool) -> SplitDataset:
    """User data: exactly one of ``path`` (folder form) or ``manifest`` (CSV form); relative paths are
    taken relative to the data root."""
    if (path is None) == (manifest is None):
        raise ValueError(f"dataset {name!r} needs exactly one of the options 'path' (a folder with train/ and "
                         "test/ class folders) or 'manifest' (a CSV with columns path,label,split)")
    for key, value in (("path", path), ("manifest", manifest)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"dataset {name!r} option {key!r}: expected a path string, got {value!r}")
    if metric not in FOLDER_METRICS:
        raise ValueError(f"dataset {name!r} option 'metric': {metric!r} is not one of {', '.join(FOLDER_METRICS)}")
    _check_fraction(name, val_fraction)
    if path is not None:
        base = _resolve(path, root)
        rows, source = _scan_folder(base), f"image folder {base}"
    else:
        mpath = _resolve(manifest, root)  # type: ignore[arg-type]
        base = mpath.parent
        rows, source = _read_manifest(mpath), f"manifest {mpath}"
    info = DatasetInfo(name=name, num_classes=0, metric=metric, val_rule="heldout", offline=True)
    return _from_rows(name, info, rows, base, val_fraction=val_fraction, split_seed=split_seed, verify=verify,
                      source=source)


BIRDSNAP_HELP = (
    "Birdsnap has no downloadable archive: fetch the images with the get_birdsnap.py script that ships with "
    "the dataset (http://thomasberg.org/), then write a CSV manifest with columns path,label,split "
    "(split 'test' for the files in test_images.txt, 'train' for the rest) and pass it as the option "
    "`manifest: /path/to/manifest.csv` (default: <data_root>/birdsnap/manifest.csv)")


def build_birdsnap(*, name: str, root: Path, download: bool, manifest: str | None, val_fraction: float,
                   split_seed: int, verify: bool) -> SplitDataset:
    """Birdsnap through its manifest (500 species; validation held out from train)."""
    _check_fraction(name, val_fraction)
    if manifest is not None and not isinstance(manifest, str):
        raise ValueError(f"dataset {name!r} option 'manifest': expected a path string, got {manifest!r}")
    mpath = _resolve(manifest, root) if manifest else root / "birdsnap" / "manifest.csv"
    if download:
        log.warning("birdsnap cannot be downloaded automatically; reading %s", mpath)
    if not mpath.is_file():
        raise DatasetNotFoundError(f"birdsnap: no manifest at {mpath}. {BIRDSNAP_HELP}")
    info = DATASETS.get("birdsnap").info
    ds = _from_rows(name, info, _read_manifest(mpath), mpath.parent, val_fraction=val_fraction,
                    split_seed=split_seed, verify=verify, source=f"manifest {mpath}")
    if ds.info.num_classes != info.num_classes:
        log.warning("birdsnap manifest %s has %d classes, the paper's Birdsnap has %d", mpath,
                    ds.info.num_classes, info.num_classes)
    return ds


_HELDOUT_HELP = {
    "val_fraction": "fraction of each class held out from train as validation (when there is no official val)",
    "split_seed": "seed of the held-out validation split",
    "verify": "open every image header when building, so unreadable files fail early",
}

DATASETS.add("imagefolder", DatasetEntry(
    info=DatasetInfo(name="imagefolder", num_classes=0, metric="top1", val_rule="heldout", offline=True,
                     description="your images: a train/[val/]test class-folder tree or a CSV manifest"),
    options={"path": None, "manifest": None, "metric": "top1", "val_fraction": 0.2, "split_seed": 0,
             "verify": True},
    builder=build_imagefolder,
    option_help={"path": "folder with train/<class>/, test/<class>/ and optional val/<class>/ (relative to "
                         "data_root unless absolute)",
                 "manifest": "CSV with columns path,label,split (relative paths: to the CSV's folder)",
                 "metric": f"one of {', '.join(FOLDER_METRICS)}", **_HELDOUT_HELP},
))

DATASETS.add("birdsnap", DatasetEntry(
    info=DatasetInfo(name="birdsnap", num_classes=500, metric="top1", val_rule="heldout",
                     description="Birdsnap (Berg et al. 2014), read from a path,label,split CSV manifest"),
    options={"manifest": None, "val_fraction": 0.2, "split_seed": 0, "verify": True},
    builder=build_birdsnap,
    option_help={"manifest": "CSV with columns path,label,split (default <data_root>/birdsnap/manifest.csv)",
                 **_HELDOUT_HELP},
))
