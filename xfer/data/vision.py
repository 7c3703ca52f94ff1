"""The paper's datasets through torchvision (Birdsnap, which torchvision lacks, is in ``folder``).

torchvision finds, checks and (with ``download=True``) fetches the files under ``root`` in its usual
layout, so an existing torchvision data folder works as is. We take the file lists and labels it
parsed and apply the paper's split rule (README: Protocol notes) ourselves: held-out validation is a seeded,
stratified 20% of train; "official" uses the dataset's own val; Caltech-101 takes 30 random images
per class for train (val held out from those) and tests on the rest; SUN397 needs its official
partition files (not in the image archive; a random split only on request, ``random_split``); VOC 2007
marks a class an image holds only as "difficult" objects as ``metrics.IGNORE``, which ``map11`` leaves
out as the devkit does. Each entry ships the published class count and split sizes (``PaperSplits``),
which ``xfer datasets`` prints and a default build is checked against. Images are loaded by
``folder.load_rgb`` so a corrupt file is reported by name (``BadImageError``, at first read: these
folders are large and come from a checked archive, so there is no build-time image pass). A missing
dataset is a ``DatasetNotFoundError`` naming the path torchvision expected and how to get the files
(``download: true``, or manual steps where torchvision cannot download).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from xfer.data.registry import DATASETS, DatasetEntry, DatasetNotFoundError, PaperSplits
from xfer.data.base import DatasetInfo
from xfer.data.folder import BadDataError, FileImages, load_rgb
from xfer.data.splits import ArrayPool, Part, SplitDataset, heldout_parts, per_class_sample, stratified_holdout
from xfer.metrics import IGNORE

log = logging.getLogger(__name__)


class _Torchvision:
    """torchvision, imported on first use: registering the paper's datasets (every ``xfer plan``)
    must not pay for importing it."""

    def __getattr__(self, name: str) -> Any:
        import torchvision as tv

        return getattr(tv, name)


torchvision = _Torchvision()

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

Pools = dict[str, Dataset]
Parts = dict[str, list[Part]]


@dataclass
class Loaded:
    """What a loader hands back: the pools, which parts make each split, class names, the split rule."""

    pools: Pools
    parts: Parts
    classes: list[str]
    rule: dict[str, Any] = field(default_factory=dict)
    expected_classes: int | None = None  # when options change the class count (Caltech without background)


def _why(e: BaseException) -> str:
    """torchvision's own reason on one line, minus its advice to pass ``download=True`` (ours says how)."""
    text = " ".join(str(e).split()) or type(e).__name__
    for advice in (" You can use download=True to download it", "You can use download=True to download it"):
        text = text.replace(advice, "")
    return text.rstrip(" .") or type(e).__name__


def _open(cls: Callable[..., Any], name: str, root: Path, download: bool, expected: str, manual: str = "",
          **kwargs: Any) -> Any:
    """Instantiate a torchvision dataset, turning "not found" into one line that says which path was
    expected and how to get the files there."""
    try:
        return cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        where = expected.format(root=root)
        if download:
            how = manual or (f"check this machine can reach the dataset's server, or fetch the files yourself into "
                             f"{where}, or point data_root at a folder that already holds them")
            raise DatasetNotFoundError(f"{name}: could not fetch or read the dataset under {where} ({_why(e)}); "
                                       f"{how}") from None
        how = manual or (f"set `download: true` in the sweep (or build_dataset(..., download=True)) to let "
                         f"torchvision fetch it into {root}, or point data_root at a folder that already holds "
                         f"it in torchvision's layout")
        raise DatasetNotFoundError(f"{name}: dataset files not found under {where} ({_why(e)}); {how}") from None


def _attr(ds: Any, *names: str) -> Any:
    """torchvision's parsed file lists are private attributes; fail clearly if a release renames them."""
    for n in names:
        if hasattr(ds, n):
            return getattr(ds, n)
    raise RuntimeError(f"torchvision {torchvision.__version__} {type(ds).__name__} has none of the attributes "
                       f"{', '.join(names)} that xfer reads its file list from; please report this")


def _whole(pools: Pools, *names: str) -> list[Part]:
    return [Part(n, np.arange(len(pools[n]))) for n in names]


def _heldout(pools: Pools, opts: Mapping[str, Any]) -> tuple[Parts, dict[str, Any]]:
    """Held-out rule: stratified ``val_fraction`` of the train pool is val; test is the test pool."""
    targets = np.asarray(pools["train"].targets)  # type: ignore[attr-defined]
    tr, va = heldout_parts(targets, opts["val_fraction"], opts["split_seed"])
    parts = {"train": [tr], "val": [va], "test": _whole(pools, "test")}
    return parts, {"val": "heldout", "fraction": opts["val_fraction"], "seed": opts["split_seed"]}


def _official(pools: Pools) -> tuple[Parts, dict[str, Any]]:
    return {s: _whole(pools, s) for s in ("train", "val", "test")}, {"val": "official"}


def _file_pool(ds: Any, files: str = "_image_files", labels: str = "_labels") -> FileImages:
    return FileImages(list(_attr(ds, files)), list(_attr(ds, labels)))


# ------------------------------------------------------------------------------------------ loaders
def _cifar(cls: str, expected: str) -> Callable[..., Loaded]:
    """CIFAR-10/100 (``cls``: the torchvision dataset class name)."""
    def load(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
        pools: Pools = {}
        classes: list[str] = []
        for split, train in (("train", True), ("test", False)):
            ds = _open(getattr(torchvision.datasets, cls), name, root, download, expected, train=train)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            pools[split] = ArrayPool(images, np.asarray(ds.targets, dtype=np.int64))
            classes = list(ds.classes)
        parts, rule = _heldout(pools, opts)
        return Loaded(pools, parts, classes, rule)
    return load


def _food101(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    pools: Pools = {}
    for split in ("train", "test"):
        ds = _open(torchvision.datasets.Food101, name, root, download, "{root}/food-101", split=split)
        pools[split] = _file_pool(ds)
    parts, rule = _heldout(pools, opts)
    return Loaded(pools, parts, list(ds.classes), rule)


def _stanford_cars(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    manual = ("torchvision can no longer download Stanford Cars (the original URL is gone): get the archive from "
              "a mirror (e.g. Kaggle) and lay it out as {root}/stanford_cars/{devkit/, cars_train/, cars_test/, "
              "cars_test_annos_withlabels.mat}").replace("{root}", str(root))
    pools: Pools = {}
    for split in ("train", "test"):
        ds = _open(torchvision.datasets.StanfordCars, name, root, download, "{root}/stanford_cars", manual,
                   split=split)
        samples = _attr(ds, "_samples")
        pools[split] = FileImages([s[0] for s in samples], [s[1] for s in samples])
    parts, rule = _heldout(pools, opts)
    return Loaded(pools, parts, list(ds.classes), rule)


def _fgvc_aircraft(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    pools: Pools = {}
    for split in ("train", "val", "test"):
        ds = _open(torchvision.datasets.FGVCAircraft, name, root, download, "{root}/fgvc-aircraft-2013b",
                   split=split, annotation_level="variant")
        pools[split] = _file_pool(ds)
    parts, rule = _official(pools)
    return Loaded(pools, parts, list(ds.classes), rule)


def _dtd(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    partition = opts["partition"]
    if not 1 <= partition <= 10:
        raise ValueError(f"dataset {name!r} option 'partition' must be 1..10, got {partition!r}")
    found: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "val", "test"):
        ds = _open(torchvision.datasets.DTD, name, root, download, "{root}/dtd/dtd", split=split,
                   partition=partition)
        # DTD numbers classes per split file; name them by folder so every split shares one index
        found[split] = [(str(f), Path(f).parent.name) for f in _attr(ds, "_image_files")]
    classes = sorted({c for rows in found.values() for _, c in rows})
    index = {c: i for i, c in enumerate(classes)}
    pools: Pools = {s: FileImages([f for f, _ in rows], [index[c] for _, c in rows]) for s, rows in found.items()}
    parts, rule = _official(pools)
    rule["partition"] = partition
    return Loaded(pools, parts, classes, rule)


def _oxford_pets(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    pools: Pools = {}
    for pool, split in (("train", "trainval"), ("test", "test")):
        ds = _open(torchvision.datasets.OxfordIIITPet, name, root, download, "{root}/oxford-iiit-pet",
                   split=split, target_types="category")
        pools[pool] = _file_pool(ds, "_images", "_labels")
        classes = list(ds.classes)
    parts, rule = _heldout(pools, opts)  # the paper holds val out of the official trainval
    return Loaded(pools, parts, classes, rule)


def _flowers102(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    pools: Pools = {}
    for split in ("train", "val", "test"):
        ds = _open(torchvision.datasets.Flowers102, name, root, download, "{root}/flowers-102", split=split)
        pools[split] = _file_pool(ds)
    parts, rule = _official(pools)
    return Loaded(pools, parts, list(ds.classes), rule)


def _caltech101(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    ds = _open(torchvision.datasets.Caltech101, name, root, download, "{root}/caltech101/101_ObjectCategories",
               target_type="category")
    # torchvision drops BACKGROUND_Google; the paper's 102 classes keep it, so list the files ourselves
    cat_dir = Path(ds.root) / "101_ObjectCategories"
    classes = sorted(p.name for p in cat_dir.iterdir() if p.is_dir())
    if not opts["background"]:
        classes = [c for c in classes if c != "BACKGROUND_Google"]
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        imgs = sorted((cat_dir / c).glob("*.jpg"))
        files.extend(imgs)
        labels.extend([i] * len(imgs))
    pools: Pools = {"all": FileImages(files, labels)}
    y = np.asarray(labels, dtype=np.int64)
    k, seed = opts["train_per_class"], opts["split_seed"]
    picked, rest = per_class_sample(y, k, seed)
    tr, va = stratified_holdout(y[picked], opts["val_fraction"], seed)
    parts = {"train": [Part("all", picked[tr])], "val": [Part("all", picked[va])], "test": [Part("all", rest)]}
    rule = {"train": f"{k} per class", "val": "heldout", "fraction": opts["val_fraction"], "seed": seed,
            "background": opts["background"]}
    return Loaded(pools, parts, classes, rule, expected_classes=102 if opts["background"] else 101)


SUN_PARTITIONS_URL = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"
SUN_PER_CLASS = 50  # images per class in each of the official partitions' train and test lists


def _sun_partition_files(root: Path, data_dir: Path, p: int) -> tuple[Path, Path] | None:
    """``(Training_0p.txt, Testing_0p.txt)`` from the first place Partitions.zip may have been unpacked."""
    names = (f"Training_{p:02d}.txt", f"Testing_{p:02d}.txt")
    for cand in (data_dir / "Partitions", data_dir, root / "Partitions", root / "SUN397_Partitions"):
        if all((cand / n).is_file() for n in names):
            return cand / names[0], cand / names[1]
    return None


def _sun397(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    """SUN397 split ``partition`` from the official partition files; they are not in the image archive
    (torchvision downloads only that), so without them this is an error saying where to put them. A
    seeded random 50 + 50 per class is used only when the spec asks for it (``random_split: true``);
    the choice is in the split rule, hence in the fingerprint and the trial key, and logged."""
    p = opts["partition"]
    if not 1 <= p <= 10:
        raise ValueError(f"dataset {name!r} option 'partition' must be 1..10, got {p!r}")
    ds = _open(torchvision.datasets.SUN397, name, root, download, "{root}/SUN397")
    data_dir = Path(_attr(ds, "_data_dir"))
    rows = sorted(zip(map(str, _attr(ds, "_image_files")), _attr(ds, "_labels")))  # rglob order is not stable
    pool = FileImages([r[0] for r in rows], [r[1] for r in rows])
    y = pool.targets
    seed = opts["split_seed"]
    files = _sun_partition_files(root, data_dir, p)
    rule: dict[str, Any]
    if opts["random_split"]:
        log.warning("sun397: random split (the spec's `random_split: true`): a seeded random %d train + %d test "
                    "images per class (seed %d), not the official partition %d; results are not comparable "
                    "with the paper's", SUN_PER_CLASS, SUN_PER_CLASS, seed, p)
        train_all, rest = per_class_sample(y, SUN_PER_CLASS, seed)
        sub, _ = per_class_sample(y[rest], SUN_PER_CLASS, seed + 1)
        test = rest[sub]
        rule = {"split": "random", "per_class": f"{SUN_PER_CLASS} train + {SUN_PER_CLASS} test", "seed": seed}
    elif files is None:
        raise DatasetNotFoundError(
            f"{name}: the official partition files Training_{p:02d}.txt and Testing_{p:02d}.txt are not in "
            f"{data_dir / 'Partitions'} (nor in {data_dir}, {root / 'Partitions'}, {root / 'SUN397_Partitions'}); "
            f"they are not part of the image archive: download Partitions.zip from the SUN database "
            f"({SUN_PARTITIONS_URL}) and unpack it there (mkdir -p {data_dir / 'Partitions'} && unzip -j "
            f"Partitions.zip -d {data_dir / 'Partitions'}), or set the dataset option `random_split: true` "
            f"for a seeded random {SUN_PER_CLASS} + {SUN_PER_CLASS} images per class (not the paper's split)")
    else:
        where = {f: i for i, f in enumerate(pool.files)}
        picked = {}
        for split, path in zip(("train", "test"), files):
            idx = []
            for line in path.read_text().split():
                f = str(data_dir / line.strip().lstrip("/"))
                if f not in where:
                    raise DatasetNotFoundError(f"{name}: {path} lists {line} but {f} is not in the dataset")
                idx.append(where[f])
            picked[split] = np.sort(np.asarray(idx, dtype=np.int64))
        if np.intersect1d(picked["train"], picked["test"]).size:
            raise BadDataError(f"{name}: {files[0].name} and {files[1].name} share images; restore them from "
                               f"Partitions.zip ({SUN_PARTITIONS_URL})")
        train_all, test = picked["train"], picked["test"]
        rule = {"split": "official", "partition": p}
    tr, va = stratified_holdout(y[train_all], opts["val_fraction"], seed)
    parts = {"train": [Part("all", train_all[tr])], "val": [Part("all", train_all[va])], "test": [Part("all", test)]}
    rule.update(val="heldout", fraction=opts["val_fraction"], seed=seed)
    return Loaded({"all": pool}, parts, list(ds.classes), rule)


# -------------------------------------------------------------------------------------------- VOC
def _parse_xml(path: str) -> Any:
    try:
        from defusedxml.ElementTree import parse
    except ImportError:
        from xml.etree.ElementTree import parse
    return parse(path).getroot()


# the target of a class an image holds only as "difficult" objects, per the `difficult` option
VOC_DIFFICULT = {
    "ignore": IGNORE,  # the devkit: neither positive nor negative (map11 leaves the pair out)
    "positive": 1.0,  # counted as present (tfds `labels`)
    "negative": 0.0,  # counted as absent (tfds `labels_no_difficult`)
}


class VOCClassification(Dataset):
    """VOC images with 20-class multi-hot targets read from the detection XML annotations.

    A class with a non-difficult object in the image is 1; a class present only as objects marked
    "difficult" gets ``VOC_DIFFICULT[difficult]`` (by default ``IGNORE``: the devkit's label 0 in
    ``ImageSets/Main/<class>_<set>.txt``); any other class is 0.
    """

    def __init__(self, images: list[str], annotations: list[str], difficult: str) -> None:
        self.images = images
        index = {c: i for i, c in enumerate(VOC_CLASSES)}
        hard_value = VOC_DIFFICULT[difficult]
        self.targets = np.zeros((len(images), len(VOC_CLASSES)), dtype=np.float32)
        for row, ann in enumerate(annotations):
            if not os.path.isfile(ann):
                raise DatasetNotFoundError(f"voc2007: annotation {ann} is missing (for image {images[row]})")
            try:
                xml = _parse_xml(ann)
            except Exception as e:  # ParseError and defusedxml's errors share no base class
                raise BadDataError(f"voc2007: cannot parse annotation {ann} ({' '.join(str(e).split())}); the "
                                   "file is corrupt: restore it from the VOC 2007 archive") from None
            clear: set[int] = set()
            hard: set[int] = set()
            for obj in xml.iter("object"):
                cls = (obj.findtext("name") or "").strip()
                if cls not in index:
                    raise ValueError(f"voc2007: {ann} has an object of unknown class {cls!r}; "
                                     f"valid: {', '.join(VOC_CLASSES)}")
                is_hard = (obj.findtext("difficult") or "0").strip() == "1"
                (hard if is_hard else clear).add(index[cls])
            self.targets[row, sorted(hard - clear)] = hard_value
            self.targets[row, sorted(clear)] = 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return load_rgb(self.images[i]), torch.from_numpy(self.targets[i].copy())


def _voc2007(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    sets = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    pools: Pools = {}
    for split in ("train", "val", "test"):
        # the trainval and test archives are separate; only fetch (and unpack) what is missing
        fetch = download and not (sets / f"{split}.txt").is_file()
        ds = _open(torchvision.datasets.VOCDetection, name, root, fetch,
                   "{root}/VOCdevkit/VOC2007 (JPEGImages/, Annotations/, ImageSets/Main/)", year="2007",
                   image_set=split)
        pools[split] = VOCClassification(list(ds.images), list(ds.targets), opts["difficult"])
    parts, rule = _official(pools)
    rule["difficult"] = opts["difficult"]
    return Loaded(pools, parts, list(VOC_CLASSES), rule)


def _imagenet(name: str, root: Path, download: bool, opts: Mapping[str, Any]) -> Loaded:
    """ILSVRC-2012 through torchvision's ``ImageNet`` (it parses the official archives under
    ``root/imagenet``: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz; it
    cannot download them). Test is the official validation set (its test labels are not public); a
    held-out validation is drawn from train. An already unpacked folder works through ``imagefolder``."""
    where = root / "imagenet"
    if download:
        log.warning("imagenet: torchvision cannot download ImageNet; reading the archives under %s", where)
    pools: Pools = {}
    for pool, split in (("train", "train"), ("test", "val")):
        try:
            ds = torchvision.datasets.ImageNet(root=str(where), split=split)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise DatasetNotFoundError(
                f"{name}: no ImageNet under {where} ({_why(e)}); put the official archives there "
                "(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz), or use "
                "`{name: imagefolder, path: DIR}` with DIR/train/<class>/ and DIR/test/<class>/ folders") from None
        pools[pool] = FileImages([s[0] for s in ds.samples], [s[1] for s in ds.samples])
        classes = [c[0] if isinstance(c, tuple) else c for c in ds.classes]
    parts, rule = _heldout(pools, opts)
    return Loaded(pools, parts, classes, rule)


# --------------------------------------------------------------------------------------- registry
def _builder(load: Callable[..., Loaded]) -> Callable[..., SplitDataset]:
    def build(*, name: str, root: Path, download: bool, **opts: Any) -> SplitDataset:
        if "val_fraction" in opts and not 0 < opts["val_fraction"] < 1:
            raise ValueError(f"dataset {name!r} option 'val_fraction' must be in (0, 1), got {opts['val_fraction']!r}")
        expected = DATASETS.get(name).info
        got = load(name, root, download, opts)
        want = got.expected_classes or expected.num_classes
        if len(got.classes) != want:
            log.warning("%s under %s has %d classes, expected %d: is the data complete?", name, root,
                        len(got.classes), want)
        info = DatasetInfo(name=name, num_classes=len(got.classes), metric=expected.metric,
                           val_rule=expected.val_rule, multilabel=expected.multilabel, offline=False,
                           description=expected.description)
        return SplitDataset(info, got.pools, got.parts, got.classes,
                            identity={"options": dict(opts), "rule": got.rule})
    return build


HELDOUT = {"val_fraction": 0.2, "split_seed": 0}
HELDOUT_HELP = {"val_fraction": "fraction of each class held out from train as validation",
                "split_seed": "seed of the held-out validation split (fixed across trial seeds)"}

# name: (published classes and sizes, metric, val_rule, loader, options, description). The sizes are
# Kornblith et al. 2019, Table A1 (train+val / test), plus the official validation split where there is one.
_TABLE: dict[str, tuple[PaperSplits, str, str, Callable[..., Loaded], dict[str, Any], str]] = {
    "food101": (PaperSplits(101, 75_750, 25_250), "top1", "heldout", _food101, HELDOUT,
                "Food-101 (Bossard et al. 2014)"),
    "cifar10": (PaperSplits(10, 50_000, 10_000), "top1", "heldout", _cifar("CIFAR10", "{root}/cifar-10-batches-py"),
                HELDOUT, "CIFAR-10"),
    "cifar100": (PaperSplits(100, 50_000, 10_000), "top1", "heldout",
                 _cifar("CIFAR100", "{root}/cifar-100-python"), HELDOUT, "CIFAR-100"),
    "sun397": (PaperSplits(397, 19_850, 19_850), "top1", "heldout", _sun397,
               {**HELDOUT, "partition": 1, "random_split": False},
               "SUN397 split 1 (Partitions/Training_01, Testing_01)"),
    "stanford_cars": (PaperSplits(196, 8_144, 8_041), "top1", "heldout", _stanford_cars, HELDOUT,
                      "Stanford Cars (Krause et al. 2013)"),
    "fgvc_aircraft": (PaperSplits(100, 6_667, 3_333, val=3_333), "mean_per_class", "official", _fgvc_aircraft, {},
                      "FGVC Aircraft, variant level (Maji et al. 2013)"),
    "voc2007": (PaperSplits(20, 5_011, 4_952, val=2_510), "map11", "official", _voc2007, {"difficult": "ignore"},
                "PASCAL VOC 2007 as 20-class multi-label classification"),
    "dtd": (PaperSplits(47, 3_760, 1_880, val=1_880), "top1", "official", _dtd, {"partition": 1},
            "Describable Textures, split 1 (Cimpoi et al. 2014)"),
    "oxford_pets": (PaperSplits(37, 3_680, 3_669), "mean_per_class", "heldout", _oxford_pets, HELDOUT,
                    "Oxford-IIIT Pets (Parkhi et al. 2012)"),
    "caltech101": (PaperSplits(102, 3_060, 6_084), "mean_per_class", "per_class_30", _caltech101,
                   {"train_per_class": 30, "background": True, **HELDOUT},
                   "Caltech-101 with the background class: 30 random train images per class, the rest test"),
    "flowers102": (PaperSplits(102, 2_040, 6_149, val=1_020), "mean_per_class", "official", _flowers102, {},
                   "Oxford 102 Flowers (Nilsback & Zisserman)"),
}

_CHOICES: dict[str, tuple[Any, ...]] = {"difficult": tuple(VOC_DIFFICULT)}

_OPTION_HELP = {
    **HELDOUT_HELP,
    "partition": "which of the dataset's official partitions (1..10; the paper uses 1)",
    "difficult": "a class an image holds only as 'difficult' objects: ignore (the devkit: neither positive nor "
                 "negative; map11 leaves it out, training sees a 0.5 target), positive (tfds `labels`) or "
                 "negative (tfds `labels_no_difficult`)",
    "random_split": "without the official partition files, sample a seeded random 50 train + 50 test images "
                    "per class (recorded in the fingerprint; not the paper's split)",
    "train_per_class": "training images sampled per class (the rest are test)",
    "background": "keep BACKGROUND_Google as the 102nd class (the paper's count)",
}

for _name, (_paper, _metric, _rule, _load, _opts, _desc) in _TABLE.items():
    DATASETS.add(_name, DatasetEntry(
        info=DatasetInfo(name=_name, num_classes=_paper.classes, metric=_metric, val_rule=_rule,
                         multilabel=_name == "voc2007", description=_desc),
        options=dict(_opts), builder=_builder(_load), downloadable=True,
        option_help={k: _OPTION_HELP[k] for k in _opts}, paper=_paper,
        choices={k: v for k, v in _CHOICES.items() if k in _opts},
    ))

# the source task of source training (pretrain), not a transfer target: no published transfer-study sizes.
# train+val trains (1 % held out), the official validation set is its test
DATASETS.add("imagenet", DatasetEntry(
    info=DatasetInfo(name="imagenet", num_classes=1000, metric="top1", val_rule="heldout", multilabel=False,
                     description="ImageNet ILSVRC-2012 (source training; test = the official validation set)"),
    options={**HELDOUT, "val_fraction": 0.01}, builder=_builder(_imagenet), downloadable=True,
    option_help={k: _OPTION_HELP[k] for k in HELDOUT}))
