"""User data on disk: an image folder or a CSV manifest (also how Birdsnap is read).

Folder form (``path``)::

    path/train/<class>/*.jpg      required
    path/val/<class>/*.jpg        optional: an official validation split; without it 20% of train
                                  (seeded, stratified) is held out
    path/test/<class>/*.jpg       required

Manifest form (``manifest``): a CSV file with columns ``path,label,split`` (split is train, val or
test; relative paths are relative to the CSV's folder).

Class indices: a class's index is its position in the sorted list of *training* class names
(numeric order when every name is an integer). Skipping bad images never renumbers classes; only
``drop_empty_classes: true`` removes a class (one with no usable training image) from that list
before numbering, with a warning naming it. Every val/test class must have training images.

Bad data gives one line naming the file or folder and what to do (``BadDataError``, a
``DatasetNotFoundError`` so the CLI prints ``error: …``), never a PIL traceback:

* Images are checked at build time, where it is cheap (``verify: true``, the default): ``stat``
  (missing and 0-byte files), the header (non-image and unrecognised files), and the last bytes of
  JPEG/PNG files — a file that does not end in its format's end marker (the usual sign of a
  truncated copy) is fully decoded to confirm. That is one open and two small reads per file, so it
  stays cheap on large folders. ``verify_full: true`` decodes every image at build time instead
  (a few ms per image) and catches corruption in the middle of a file too.
* What the build-time check misses (or all of it, with ``verify: false``) is caught lazily: reading
  a bad image raises ``BadImageError`` naming it — as one line even from a DataLoader worker.
* ``skip_bad_images: true`` drops the files the build-time check finds instead of failing; they are
  logged once (count and first few names) and kept on the dataset (``skipped_images``,
  ``num_skipped``; ``counts()`` stays per split). With ``verify: false`` only missing and 0-byte
  files are found at build time. A bad
  file found only at read time still fails: skipping mid-epoch would change the split silently.
* An empty class folder (or a class whose training images were all skipped) is an error naming it,
  unless ``drop_empty_classes: true`` is given; then the class is dropped from every split (its
  val/test images too) and the rest are renumbered as above. An empty val/test class folder is an
  error too; with ``drop_empty_classes: true`` it is ignored (the class stays).
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from xfer.data.registry import DATASETS, DatasetEntry, DatasetNotFoundError, PaperSplits
from xfer.data.base import DatasetInfo
from xfer.data.splits import Part, SplitDataset, heldout_parts

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST_SPLITS = ("train", "val", "test")
FOLDER_METRICS = ("top1", "mean_per_class")
SHOW_SKIPPED = 5  # file names listed in the one "skipped" warning

# the end of a well-formed file: a truncated copy usually lacks it (cheap to read, confirmed by decoding)
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}

SKIP_HINT = "or set the dataset option `skip_bad_images: true` to skip such files (they are counted and logged)"
READ_HINT = ("replace or remove it; the build-time check (`verify: true`, or `verify_full: true` to decode "
             "every image) finds such files before training, and `skip_bad_images: true` then skips them")
EMPTY_HINT = ("add images to it or remove the folder, or set the dataset option `drop_empty_classes: true` to "
              "drop such classes (the remaining classes are renumbered in sorted order)")


class BadDataError(DatasetNotFoundError, ValueError):
    """Dataset files that are there but unusable as they are; one line naming the file or folder and
    the fix. A ``DatasetNotFoundError`` so the CLI prints it as ``error: …``; a ``ValueError`` because
    layout mistakes (empty folders, unseen classes) were ``ValueError`` before."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(str(message)))


def _one_line(message: str) -> str:
    """torch re-raises a DataLoader worker's exception as ``type("Caught X in DataLoader worker
    process N.\\nOriginal Traceback…")``; keep the original message and where, not the traceback."""
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        first, last = message.splitlines()[0], message.rstrip().splitlines()[-1]
        _, sep, text = last.partition(": ")
        where = first.split(" ", 2)[2].rstrip(".") if first.count(" ") >= 2 else "in a worker"
        if sep:
            return f"{text} ({where})"
    return " ".join(message.split("\n")) if "\n" in message else message


class BadImageError(BadDataError):
    """An image file that is missing, empty, not an image, or corrupt/truncated.

    ``BadImageError(path, reason)`` builds the message (``path`` and ``reason`` kept as attributes);
    a single argument is taken as the whole message (how pickling and DataLoader workers rebuild it).
    """

    def __init__(self, path: str | Path, reason: str | None = None, hint: str = f"replace or remove it, {SKIP_HINT}",
                 more: int = 0) -> None:
        if reason is None:
            super().__init__(str(path))
            self.path: str | None = None
            self.reason: str | None = None
            return
        also = f" ({more} more bad file{'s' if more != 1 else ''} found too)" if more else ""
        super().__init__(f"bad image {path}: {reason}{also}; {hint}")
        self.path, self.reason = str(path), reason


ImageReadError = BadImageError  # the earlier name


class BadFile(NamedTuple):
    """A file skipped as unusable and why."""

    path: str
    reason: str


def _reason(e: BaseException) -> str:
    """Why PIL could not read a file, without repeating the path PIL sometimes puts in its message."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can read (wrong extension, another file type, or corrupt from the start)"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode safely ({e})"
    text = str(e)
    if "truncated" in text.lower():
        return f"truncated or corrupt image data ({text})"
    return f"cannot decode ({type(e).__name__}: {text})"


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully as RGB, or raise ``BadImageError`` naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError:
        raise BadImageError(path, "file not found", READ_HINT) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, _reason(e), READ_HINT) from None


def image_problem(path: str | Path, *, full: bool = False) -> str | None:
    """Why ``path`` is not a usable image, or None.

    Cheap by default (see the module docstring): stat, header, and for JPEG/PNG the end marker,
    decoding only when the marker is missing. ``full`` decodes every file.
    """
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            marker = _END_MARKERS.get(im.format or "")
            decode = full
            if marker is not None and not full:
                with open(path, "rb") as f:
                    f.seek(max(0, size - len(marker)))
                    decode = f.read() != marker
            if decode:
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return _reason(e)
    return None


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


class FileDataset(SplitDataset):
    """A ``SplitDataset`` read from files, which remembers what the build skipped or dropped."""

    def __init__(self, *args: Any, skipped: Sequence[BadFile] = (), dropped_classes: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped_images: tuple[BadFile, ...] = tuple(skipped)
        self.dropped_classes: tuple[str, ...] = tuple(dropped_classes)

    @property
    def num_skipped(self) -> int:
        """How many files ``skip_bad_images`` left out (0 without it)."""
        return len(self.skipped_images)


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


Rows = list[tuple[str, Path, str]]  # (split, file, class)
Declared = dict[str, dict[str, Path | None]]  # split -> class -> its folder (None: from a manifest)


def _scan_folder(base: Path, root: Path) -> tuple[Rows, Declared]:
    """(split, file, class) for every image under base/{train,val,test}/<class>/, and every class
    folder per split (empty ones too, so they can be reported by name)."""
    layout = f"{base}/train/<class>/*.jpg and {base}/test/<class>/*.jpg (optionally {base}/val/<class>/)"
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist: put your images there as {layout}, or "
                                   f"set the dataset option `path` to the folder that holds them (a relative path "
                                   f"is taken from data_root, here {root})")
    found = {p.name for p in base.iterdir() if p.is_dir()}
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        raise DatasetNotFoundError(f"image folder {base} has no {' or '.join(missing)}/ folder (found: "
                                   f"{', '.join(sorted(found)) or 'nothing'}); expected {layout}")
    rows: Rows = []
    declared: Declared = {s: {} for s in MANIFEST_SPLITS}
    for split in MANIFEST_SPLITS:
        sdir = base / split
        if not sdir.is_dir():
            continue
        cdirs = sorted(p for p in sdir.iterdir() if p.is_dir())
        if not cdirs:
            raise BadDataError(f"{sdir} has no class folders: put images in {sdir}/<class>/*.jpg"
                               + (" or remove the empty folder" if split == "val" else ""))
        for cdir in cdirs:
            declared[split][cdir.name] = cdir
            files = sorted(f for f in cdir.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            rows.extend((split, f, cdir.name) for f in files)
    return rows, declared


def _read_manifest(manifest: Path, root: Path) -> tuple[Rows, Declared]:
    if not manifest.is_file():
        raise DatasetNotFoundError(f"manifest {manifest} does not exist: write a CSV file there with columns "
                                   f"path,label,split, or set the dataset option `manifest` to where yours is (a "
                                   f"relative path is taken from data_root, here {root})")
    rows: Rows = []
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        need = [c for c in ("path", "label", "split") if c not in cols]
        if need:
            raise BadDataError(f"manifest {manifest}: missing column(s) {', '.join(need)}; "
                               f"the header must name path,label,split (found: {', '.join(cols) or 'no header'})")
        for line, rec in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
            split = rec["split"].lower()
            if split not in MANIFEST_SPLITS:
                raise BadDataError(f"manifest {manifest} line {line}: split {rec['split']!r} is not one of "
                                   f"{', '.join(MANIFEST_SPLITS)}")
            if not rec["path"] or not rec["label"]:
                raise BadDataError(f"manifest {manifest} line {line}: empty path or label")
            rows.append((split, _resolve(rec["path"], manifest.parent), rec["label"]))
    if not rows:
        raise BadDataError(f"manifest {manifest} lists no images (add rows path,label,split under the header)")
    declared: Declared = {s: {} for s in MANIFEST_SPLITS}
    for split, _, label in rows:
        declared[split].setdefault(label, None)
    return rows, declared


def _check_images(rows: Rows, *, verify: bool, full: bool, skip: bool, source: str) -> tuple[Rows, list[BadFile]]:
    """The build-time image check: keep the good rows; skip (and return) or raise on the bad ones."""
    kept: Rows = []
    bad: list[BadFile] = []
    for row in rows:
        path = row[1]
        if verify or full:
            problem = image_problem(path, full=full)
        elif not path.is_file():
            problem = "file not found"
        else:
            problem = "empty file (0 bytes)" if path.stat().st_size == 0 else None
        if problem is None:
            kept.append(row)
        else:
            bad.append(BadFile(str(path), problem))
    if bad and not skip:
        first = bad[0]
        raise BadImageError(first.path, first.reason, f"replace or remove it, {SKIP_HINT}", more=len(bad) - 1)
    if bad:
        shown = "; ".join(f"{b.path} ({b.reason})" for b in bad[:SHOW_SKIPPED])
        log.warning("%s: skipped %d bad image file(s) of %d (skip_bad_images: true): %s%s", source, len(bad),
                    len(rows), shown, " …" if len(bad) > SHOW_SKIPPED else "")
    return kept, bad


def _empty_classes(rows: Rows, declared: Declared, bad: Sequence[BadFile], *, drop: bool,
                   source: str) -> tuple[Rows, list[str]]:
    """Error on (or, with ``drop``, drop) classes declared in a split with no usable image there.

    A training class without images is dropped from every split; an empty val/test folder of a
    class that has training images just contributes nothing.
    """
    have = {(s, c) for s, _, c in rows}
    empty = [(s, c) for s in MANIFEST_SPLITS for c in declared[s] if (s, c) not in have]
    if not empty:
        return rows, []
    if not drop:
        s, c = empty[0]
        folder = declared[s][c]
        others = f" ({len(empty) - 1} more empty class(es) too)" if len(empty) > 1 else ""
        if folder is not None:
            n = sum(1 for b in bad if Path(b.path).parent == folder)
            why = f" ({n} bad file(s) in it were skipped)" if n else ""
            raise BadDataError(f"{s} class folder {folder} has no usable images{why}{others}; {EMPTY_HINT}")
        raise BadDataError(f"{source}: class {c!r} has no usable {s} images (all its files were skipped as bad)"
                           f"{others}; fix or replace them, or set the dataset option `drop_empty_classes: true` "
                           "to drop such classes (the remaining classes are renumbered in sorted order)")
    dropped = sorted({c for s, c in empty if s == "train"})
    ignored = [f"{s}/{c}" for s, c in empty if s != "train" and c not in dropped]
    kept = [r for r in rows if r[2] not in dropped]
    log.warning("%s: drop_empty_classes: dropped %d class(es) with no usable training image (%s; with their %d "
                "val/test image(s))%s", source, len(dropped), ", ".join(dropped) or "none", len(rows) - len(kept),
                f"; empty val/test class folder(s) ignored: {', '.join(ignored)}" if ignored else "")
    return kept, dropped


def _from_rows(name: str, info: DatasetInfo, rows: Rows, declared: Declared, base: Path, *, val_fraction: float,
               split_seed: int, verify: bool, verify_full: bool, skip_bad_images: bool, drop_empty_classes: bool,
               source: str) -> FileDataset:
    for s in ("train", "test"):
        if not declared[s]:
            raise BadDataError(f"{source}: no {s} images (every dataset needs train and test images)")
    train_classes = set(declared["train"])
    for s in ("val", "test"):
        unknown = _sort_labels({r[2] for r in rows if r[0] == s} - train_classes)
        if unknown:
            raise BadDataError(f"{source}: {s} has classes with no training images: {', '.join(unknown[:10])}"
                               f"{' …' if len(unknown) > 10 else ''} (split {s!r}); add training images for them "
                               f"or remove them from {s}")
    seen: dict[Path, str] = {}
    for split, path, _ in rows:
        if path in seen:
            raise BadDataError(f"{source}: {path} is listed twice ({seen[path]} and {split}); "
                               "an image may belong to one split only")
        seen[path] = split
    if not drop_empty_classes:  # report empty folders before the (slower) image pass
        _empty_classes(rows, declared, [], drop=False, source=source)
    rows, bad = _check_images(rows, verify=verify, full=verify_full, skip=skip_bad_images, source=source)
    rows, dropped = _empty_classes(rows, declared, bad, drop=drop_empty_classes, source=source)
    by_split = {s: [r for r in rows if r[0] == s] for s in MANIFEST_SPLITS}
    for s in ("train", "test"):
        if not by_split[s]:
            raise BadDataError(f"{source}: no usable {s} images left ({len(bad)} bad file(s) skipped, "
                               f"{len(dropped)} class(es) dropped); fix or replace the files listed above")
    classes = _sort_labels({r[2] for r in by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    listing = []
    for split, path, label in rows:
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
    return FileDataset(info, pools, {"train": [train], "val": [val], "test": [test]}, classes,
                       identity={"files": _listing_hash(listing), "split": rule}, skipped=bad,
                       dropped_classes=dropped)


def _check_fraction(name: str, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"dataset {name!r} option 'val_fraction' must be in (0, 1), got {val_fraction!r}")


def build_imagefolder(*, name: str, root: Path, download: bool, path: str | None, manifest: str | None,
                      metric: str, val_fraction: float, split_seed: int, verify: bool, verify_full: bool,
                      skip_bad_images: bool, drop_empty_classes: bool) -> FileDataset:
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
        (rows, declared), source = _scan_folder(base, root), f"image folder {base}"
    else:
        mpath = _resolve(manifest, root)  # type: ignore[arg-type]
        base = mpath.parent
        (rows, declared), source = _read_manifest(mpath, root), f"manifest {mpath}"
    info = DatasetInfo(name=name, num_classes=0, metric=metric, val_rule="heldout", offline=True)
    return _from_rows(name, info, rows, declared, base, val_fraction=val_fraction, split_seed=split_seed,
                      verify=verify, verify_full=verify_full, skip_bad_images=skip_bad_images,
                      drop_empty_classes=drop_empty_classes, source=source)


BIRDSNAP_HELP = (
    "Birdsnap has no downloadable archive: fetch the images with the get_birdsnap.py script that ships with "
    "the dataset (http://thomasberg.org/), then write a CSV manifest with columns path,label,split "
    "(split 'test' for the files in test_images.txt, 'train' for the rest) and pass it as the option "
    "`manifest: /path/to/manifest.csv` (default: <data_root>/birdsnap/manifest.csv)")


def build_birdsnap(*, name: str, root: Path, download: bool, manifest: str | None, val_fraction: float,
                   split_seed: int, verify: bool, verify_full: bool, skip_bad_images: bool,
                   drop_empty_classes: bool) -> FileDataset:
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
    rows, declared = _read_manifest(mpath, root)
    ds = _from_rows(name, info, rows, declared, mpath.parent, val_fraction=val_fraction, split_seed=split_seed,
                    verify=verify, verify_full=verify_full, skip_bad_images=skip_bad_images,
                    drop_empty_classes=drop_empty_classes, source=f"manifest {mpath}")
    if ds.info.num_classes != info.num_classes:
        log.warning("birdsnap manifest %s has %d classes, the paper's Birdsnap has %d", mpath,
                    ds.info.num_classes, info.num_classes)
    return ds


_FILE_OPTIONS: dict[str, Any] = {"val_fraction": 0.2, "split_seed": 0, "verify": True, "verify_full": False,
                                 "skip_bad_images": False, "drop_empty_classes": False}
_FILE_HELP = {
    "val_fraction": "fraction of each class held out from train as validation (when there is no official val)",
    "split_seed": "seed of the held-out validation split",
    "verify": "check every image when building (cheap: header, and the end marker of JPEG/PNG files), so "
              "unreadable files fail early, by name",
    "verify_full": "decode every image when building (slow: a few ms per image) to catch any corruption",
    "skip_bad_images": "skip (count and log) images the build-time check finds bad instead of failing",
    "drop_empty_classes": "drop classes with no usable training image instead of failing (the rest are "
                          "renumbered in sorted order)",
}

DATASETS.add("imagefolder", DatasetEntry(
    info=DatasetInfo(name="imagefolder", num_classes=0, metric="top1", val_rule="heldout", offline=True,
                     description="your images: a train/[val/]test class-folder tree or a CSV manifest"),
    options={"path": None, "manifest": None, "metric": "top1", **_FILE_OPTIONS},
    builder=build_imagefolder,
    option_help={"path": "folder with train/<class>/, test/<class>/ and optional val/<class>/ (relative to "
                         "data_root unless absolute)",
                 "manifest": "CSV with columns path,label,split (relative paths: to the CSV's folder)",
                 "metric": f"one of {', '.join(FOLDER_METRICS)}", **_FILE_HELP},
))

DATASETS.add("birdsnap", DatasetEntry(
    info=DatasetInfo(name="birdsnap", num_classes=500, metric="top1", val_rule="heldout",
                     description="Birdsnap (Berg et al. 2014), read from a path,label,split CSV manifest"),
    options={"manifest": None, **_FILE_OPTIONS},
    builder=build_birdsnap,
    option_help={"manifest": "CSV with columns path,label,split (default <data_root>/birdsnap/manifest.csv)",
                 **_FILE_HELP},
    paper=PaperSplits(500, 47_386, 2_443),
))
