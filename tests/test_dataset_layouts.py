"""The paper's twelve datasets read from tiny fake copies of their real on-disk layouts.

Each fake writes the files the loader (torchvision's dataset class, or our manifest reader) actually
opens — annotation files, ``.mat`` files, split lists, pickled batches — with the published number
of classes and a few images per class, then checks the classes, the split sizes the split rule must
give, and the metric. Also: the registry's published sizes against the paper's table, what
``xfer datasets`` prints, SUN397 without its partition files, and VOC 2007's "difficult" objects
against the devkit's ground truth and a hand-worked average precision.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from xfer.data import DATASETS, DatasetNotFoundError, build_dataset
from xfer.data.registry import PaperSplits, resolve_options
from xfer.options import OptionError
from xfer.metrics import IGNORE, compute_metric

# Kornblith, Shlens & Le 2019, Table A1: classes, train (which includes validation) / test, metric;
# plus the size of the official validation split where the dataset has one.
PAPER_TABLE = {
    "food101": (101, 75_750, 25_250, None, "top1"),
    "cifar10": (10, 50_000, 10_000, None, "top1"),
    "cifar100": (100, 50_000, 10_000, None, "top1"),
    "birdsnap": (500, 47_386, 2_443, None, "top1"),
    "sun397": (397, 19_850, 19_850, None, "top1"),
    "stanford_cars": (196, 8_144, 8_041, None, "top1"),
    "fgvc_aircraft": (100, 6_667, 3_333, 3_333, "mean_per_class"),
    "voc2007": (20, 5_011, 4_952, 2_510, "map11"),
    "dtd": (47, 3_760, 1_880, 1_880, "top1"),
    "oxford_pets": (37, 3_680, 3_669, None, "mean_per_class"),
    "caltech101": (102, 3_060, 6_084, None, "mean_per_class"),
    "flowers102": (102, 2_040, 6_149, 1_020, "mean_per_class"),
}

_JPEG: dict[int, bytes] = {}


def _jpeg_bytes(shade: int) -> bytes:
    """A 4×4 JPEG of one grey level (encoded once per level: fakes write thousands of files)."""
    shade %= 256
    if shade not in _JPEG:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (shade, shade, shade)).save(buf, "JPEG")
        _JPEG[shade] = buf.getvalue()
    return _JPEG[shade]


def _img(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(shade))


def _names(prefix: str, n: int, real: list[str]) -> list[str]:
    """``n`` class names: the given real ones (awkward characters included) and numbered fillers."""
    return real + [f"{prefix}{i:03d}" for i in range(n - len(real))]


def _heldout(per_class_train: int, classes: int, fraction: float = 0.2) -> tuple[int, int]:
    """(train, val) sizes of the stratified held-out rule for equal classes."""
    n_val = min(round(fraction * per_class_train), per_class_train - 1)
    return (per_class_train - n_val) * classes, n_val * classes


def _check(ds, name: str, classes: list[str], counts: dict[str, int]) -> None:
    n, _, _, _, metric = PAPER_TABLE[name]
    assert ds.class_names() == classes
    assert ds.info.num_classes == len(classes) == n
    assert ds.info.metric == metric
    assert ds.counts() == counts


@pytest.fixture
def no_md5(monkeypatch):
    """CIFAR and Flowers-102 compare their files' MD5 with the official archive's even without
    download; files fabricated here can only be checked for existence."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(flowers, "check_integrity", exists)


# ---------------------------------------------------------------------------- the published table
def test_registry_ships_the_papers_table():
    for name, (classes, trainval, test, val, metric) in PAPER_TABLE.items():
        entry = DATASETS.get(name)
        assert entry.paper == PaperSplits(classes, trainval, test, val), name
        assert entry.info.num_classes == classes and entry.info.metric == metric, name
        assert (entry.info.val_rule == "official") == (val is not None), name
    # only the paper's datasets claim published sizes
    assert {n for n in DATASETS.names() if DATASETS.get(n).paper} == set(PAPER_TABLE)


def test_published_sizes_are_consistent_and_compared():
    p = PaperSplits(102, 2_040, 6_149, val=1_020)
    assert p.train == 1_020 and PaperSplits(10, 50_000, 10_000).train is None
    assert p.mismatches(102, {"trainval": 2_040, "val": 1_020, "test": 6_149}) == []
    assert p.mismatches(101, {"trainval": 2_040, "val": 1_000, "test": 6_149}) == \
        ["classes 101 (published: 102)", "val 1000 (published: 1020)"]
    with pytest.raises(ValueError, match="official val size"):
        PaperSplits(10, 100, 10, val=100)


def test_xfer_datasets_prints_the_papers_sizes(capsys):
    from xfer.cli import main

    assert main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    rows = {line.split()[0]: dict(zip(header, line.split())) for line in lines[1:] if line.split()[0] in DATASETS}
    assert set(rows) == set(DATASETS.names())
    for name, (classes, trainval, test, val, metric) in PAPER_TABLE.items():
        row = rows[name]
        assert (row["classes"], row["metric"]) == (str(classes), metric), row
        assert (row["train+val"], row["test"]) == (f"{trainval:,}", f"{test:,}"), row
        assert row["val"] == (f"{val:,}" if val else "20%"), row
    assert rows["digits"]["train+val"] == "—"
    assert "Table A1" in lines[-1]


# ------------------------------------------------------------------------------------- Food-101
def fake_food101(root: Path, train: int = 5, test: int = 2) -> list[str]:
    base = root / "food-101"
    classes = _names("dish", 101, ["apple_pie", "baby_back_ribs", "beef_carpaccio"])
    lists: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for c_i, c in enumerate(classes):
        ids = [f"{c}/{100000 + 7 * k + c_i}" for k in range(train + test)]
        lists["train"][c], lists["test"][c] = ids[:train], ids[train:]
        for rel in ids:
            _img(base / "images" / f"{rel}.jpg", c_i)
    meta = base / "meta"
    meta.mkdir(parents=True)
    (meta / "classes.txt").write_text("\n".join(classes) + "\n")
    (meta / "labels.txt").write_text("\n".join(c.replace("_", " ").capitalize() for c in classes) + "\n")
    for split, per_class in lists.items():
        (meta / f"{split}.json").write_text(json.dumps(per_class))
        (meta / f"{split}.txt").write_text("\n".join(r for rels in per_class.values() for r in rels) + "\n")
    return classes


def test_food101_layout(tmp_path, caplog):
    classes = fake_food101(tmp_path)
    with caplog.at_level(logging.WARNING, logger="xfer.data.registry"):
        ds = build_dataset("food101", root=tmp_path)
    tr, va = _heldout(5, 101)
    _check(ds, "food101", sorted(classes), {"train": tr, "val": va, "trainval": tr + va, "test": 202})
    img, y = ds.split("test")[0]
    assert ds.class_names()[y] == "apple_pie" and img.getpixel((0, 0))[0] < 8
    # a build at the default options is compared with the published size
    assert "differs from its published size: train+val 505 (published: 75750), test 202 (published: 25250)" \
        in caplog.text


# ------------------------------------------------------------------------------- CIFAR-10 / 100
def test_cifar10_layout(tmp_path, no_md5):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for b_i, fname in enumerate(batches):
        n = 10  # one image per class per batch: 5 per class in train, 1 in test
        labels = [(j + b_i) % 10 for j in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(base / fname, "wb") as f:
            pickle.dump({"batch_label": f"batch {b_i}", "labels": labels, "data": data,
                         "filenames": [f"img_{b_i}_{j}.png" for j in range(n)]}, f)
        if fname == "test_batch":
            first = (data[3], labels[3])
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": 10, "label_names": names, "num_vis": 3072}, f)
    (base / "readme.html").write_text("<html></html>")
    ds = build_dataset("cifar10", root=tmp_path)
    tr, va = _heldout(5, 10)
    _check(ds, "cifar10", names, {"train": tr, "val": va, "trainval": tr + va, "test": 10})
    x, y = ds.split("test")[3]
    assert torch.equal(x, torch.from_numpy(first[0].reshape(3, 32, 32))) and y == first[1]


def test_cifar100_layout(tmp_path, no_md5):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    fine = _names("fine", 100, ["apple", "aquarium_fish", "maple_tree"])
    rng = np.random.default_rng(1)
    for fname, per_class in (("train", 5), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        with open(base / fname, "wb") as f:
            pickle.dump({"filenames": [f"{fname}_{i}.png" for i in range(len(labels))], "batch_label": fname,
                         "fine_labels": labels, "coarse_labels": [c // 5 for c in labels],
                         "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    ds = build_dataset("cifar100", root=tmp_path)
    tr, va = _heldout(5, 100)
    _check(ds, "cifar100", fine, {"train": tr, "val": va, "trainval": tr + va, "test": 100})
    assert ds.targets("test").tolist() == list(range(100))  # the fine labels, not the coarse ones


# --------------------------------------------------------------------------------------- Birdsnap
def test_birdsnap_manifest_layout(tmp_path):
    """Birdsnap as get_birdsnap.py leaves it (images/<species>/, test_images.txt) plus the CSV manifest
    the user writes from it (the loader reads only the manifest)."""
    bird = tmp_path / "birdsnap"
    species = _names("Species_", 500, ["Acadian_Flycatcher", "Black-and-white_Warbler"])
    test_files, rows = [], ["path,label,split"]
    for s_i, s in enumerate(species):
        for k in range(4):
            rel = f"images/{s}/{k:03d}.jpg"
            _img(bird / rel, s_i)
            if k == 3:
                test_files.append(rel[len("images/"):])
    (bird / "test_images.txt").write_text("path\n" + "\n".join(test_files) + "\n")
    tests = set(test_files)
    for s in species:
        for k in range(4):
            rel = f"{s}/{k:03d}.jpg"
            rows.append(f"images/{rel},{s},{'test' if rel in tests else 'train'}")
    (bird / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset("birdsnap", root=tmp_path)
    tr, va = _heldout(3, 500)
    _check(ds, "birdsnap", sorted(species), {"train": tr, "val": va, "trainval": tr + va, "test": 500})


# ----------------------------------------------------------------------------------------- SUN397
SUN_REAL = ["/a/abbey", "/a/apartment_building/outdoor", "/b/beach"]


def fake_sun397(root: Path, n_classes: int = 397, per_class: int = 6, partitions: str | None = "SUN397/Partitions",
                train: int = 3, test: int = 2) -> list[str]:
    """``SUN397/ClassName.txt``, ``SUN397/<letter>/<class>/sun_*.jpg`` and, unless ``partitions`` is
    None, ``Training_01.txt`` / ``Testing_01.txt`` under it (paths as in Partitions.zip: ``/a/abbey/…``)."""
    base = root / "SUN397"
    lines = (SUN_REAL + [f"/{chr(ord('c') + i % 20)}/scene{i:03d}" for i in range(n_classes - len(SUN_REAL))]
             )[:n_classes]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(lines) + "\n")
    lists: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    for c_i, line in enumerate(lines):
        for k in range(per_class):  # the rest of each class is in neither list (as in the real partitions)
            rel = f"{line}/sun_{c_i:04d}{k:04d}abcdefgh.jpg"
            _img(base / rel.lstrip("/"), c_i)
            if k < train:
                lists["Training_01.txt"].append(rel)
            elif k < train + test:
                lists["Testing_01.txt"].append(rel)
    if partitions is not None:
        (root / partitions).mkdir(parents=True, exist_ok=True)
        for fname, rels in lists.items():
            (root / partitions / fname).write_text("\n".join(rels) + "\n")
    return [line[3:] for line in lines]


def test_sun397_layout_with_official_partitions(tmp_path):
    classes = fake_sun397(tmp_path)
    ds = build_dataset("sun397", root=tmp_path)
    tr, va = _heldout(3, 397)
    _check(ds, "sun397", classes, {"train": tr, "val": va, "trainval": tr + va, "test": 2 * 397})
    assert classes[1] == "apartment_building/outdoor"
    assert np.bincount(ds.targets("test")).tolist() == [2] * 397
    test_files = {Path(ds.split("test").pools["all"].files[i]).name for i in ds.parts("test")[0][1]}
    assert all(int(f[4:12]) % 10_000 in (3, 4) for f in test_files)  # exactly the listed files


def test_sun397_partitions_unpacked_without_a_folder(tmp_path):
    """Partitions.zip's text files unpacked straight into SUN397/ are found too."""
    fake_sun397(tmp_path, n_classes=3, partitions="SUN397")
    assert build_dataset("sun397", root=tmp_path).counts()["test"] == 6


def test_sun397_without_partition_files_is_an_error_that_says_how(tmp_path):
    fake_sun397(tmp_path, n_classes=3, partitions=None)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("sun397", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "SUN397" / "Partitions") in msg and "Training_01.txt" in msg
    assert "Partitions.zip" in msg and "https://vision.princeton.edu/" in msg
    assert "random_split: true" in msg


def test_sun397_random_split_only_on_request_and_recorded(tmp_path, caplog):
    fake_sun397(tmp_path, n_classes=2, per_class=104, partitions="SUN397/Partitions", train=50, test=50)
    official = build_dataset("sun397", root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="xfer.data.vision"):
        rnd = build_dataset("sun397", root=tmp_path, random_split=True)
    assert "random split" in caplog.text and "not the official partition 1" in caplog.text
    tr, va = _heldout(50, 2)
    assert rnd.counts() == official.counts() == {"train": tr, "val": va, "trainval": tr + va, "test": 100}
    assert not np.array_equal(rnd.parts("test")[0][1], official.parts("test")[0][1])  # 4 unlisted per class
    # the split is part of what the data is: fingerprint (feature/trial keys, the MLflow tag) and options
    assert rnd.fingerprint() != official.fingerprint()
    assert rnd.fingerprint() == build_dataset("sun397", root=tmp_path, random_split=True).fingerprint()
    assert rnd.fingerprint() != build_dataset("sun397", root=tmp_path, random_split=True, split_seed=1).fingerprint()


# ---------------------------------------------------------------------------------- Stanford Cars
def _annotations(rows: list[tuple[str, int]], with_class: bool = True) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    out = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(rows):
        vals = [1, 2, 3, 4] + ([cls] if with_class else []) + [fname]
        for f, v in zip(fields, vals):
            out[0, i][f] = v
    return out


def test_stanford_cars_layout(tmp_path):
    base = tmp_path / "stanford_cars"
    names = _names("Car Model ", 196, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"])
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for split, per_class in (("train", 4), ("test", 2)):
        for k in range(per_class):
            for c in range(196):
                fname = f"{len(rows[split]) + 1:05d}.jpg"
                rows[split].append((fname, c + 1))  # 1-based class ids, as in the devkit
                _img(base / f"cars_{split}" / fname, c)
    (base / "devkit").mkdir()
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows["train"])})
    scipy.io.savemat(base / "devkit" / "cars_test_annos.mat", {"annotations": _annotations(rows["test"], False)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _annotations(rows["test"])})
    ds = build_dataset("stanford_cars", root=tmp_path)
    tr, va = _heldout(4, 196)
    _check(ds, "stanford_cars", names, {"train": tr, "val": va, "trainval": tr + va, "test": 2 * 196})
    img, y = ds.split("test")[196 + 5]  # second round of test files: class 6 (index 5)
    assert y == 5 and img.getpixel((0, 0))[0] == pytest.approx(5, abs=4)


# ---------------------------------------------------------------------------------- FGVC Aircraft
def test_fgvc_aircraft_layout(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = _names("Variant-", 100, ["707-320", "Boeing 737-700", "F/A-18", "Tu-154"])
    per_split = {"train": 2, "val": 1, "test": 1}
    lines: dict[str, list[str]] = {s: [] for s in per_split}
    n = 1_000_000
    for v_i, v in enumerate(variants):
        for split, k in per_split.items():
            for _ in range(k):
                n += 1
                lines[split].append(f"{n:07d} {v}")
                _img(data / "images" / f"{n:07d}.jpg", v_i)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "families.txt").write_text("Boeing 707\n")
    (data / "manufacturers.txt").write_text("Boeing\n")
    for split, rows in lines.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        (data / f"images_{split}.txt").write_text("\n".join(r.split()[0] for r in rows) + "\n")
    (data / "images_variant_trainval.txt").write_text("\n".join(lines["train"] + lines["val"]) + "\n")
    ds = build_dataset("fgvc_aircraft", root=tmp_path)
    _check(ds, "fgvc_aircraft", variants, {"train": 200, "val": 100, "trainval": 300, "test": 100})
    assert ds.targets("val").tolist() == list(range(100))
    assert ds.class_names()[ds.targets("test")[2]] == "F/A-18"


# --------------------------------------------------------------------------------------- VOC 2007
VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
       "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

# image → (class, difficult) objects. Test images 000101-000105 are the hand-worked case below.
VOC_OBJECTS = {
    "000005": [("chair", 0), ("chair", 1)], "000007": [("car", 0)], "000009": [("horse", 0), ("person", 1)],
    "000012": [("car", 0), ("dog", 1)], "000016": [("bicycle", 0)], "000017": [("person", 0), ("horse", 0)],
    "000101": [("dog", 0)],
    "000102": [("dog", 1), ("person", 0)],  # dog only as difficult: the devkit's label 0 for dog
    "000103": [("cat", 0)],
    "000104": [("dog", 0), ("dog", 1)],  # a clear dog besides a difficult one: positive
    "000105": [("person", 1), ("person", 0)],
}
VOC_SETS = {"train": ["000005", "000007", "000009"], "val": ["000012", "000016", "000017"],
            "test": ["000101", "000102", "000103", "000104", "000105"]}


def _voc_xml(img_id: str, objects: list[tuple[str, int]]) -> str:
    objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>3</ymax>"
                   f"</bndbox></object>" for n, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{img_id}.jpg</filename><source><database>The VOC2007 "
            f"Database</database></source><size><width>4</width><height>4</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def fake_voc2007(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    for img_id, objects in VOC_OBJECTS.items():
        _img(voc / "JPEGImages" / f"{img_id}.jpg")
        (voc / "Annotations" / f"{img_id}.xml").write_text(_voc_xml(img_id, objects))
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    sets = {**VOC_SETS, "trainval": VOC_SETS["train"] + VOC_SETS["val"]}
    for split, ids in sets.items():
        (main / f"{split}.txt").write_text("\n".join(ids) + "\n")
    # the devkit's per-class ground truth, worked out by hand from VOC_OBJECTS: 1 present, 0 only difficult
    devkit = {("dog", "000012"): 0, ("dog", "000101"): 1, ("dog", "000102"): 0, ("dog", "000104"): 1,
              ("person", "000009"): 0, ("person", "000017"): 1, ("person", "000102"): 1, ("person", "000105"): 1,
              ("chair", "000005"): 1, ("car", "000007"): 1, ("car", "000012"): 1, ("horse", "000009"): 1,
              ("horse", "000017"): 1, ("bicycle", "000016"): 1, ("cat", "000103"): 1}
    for cls in VOC:
        for split, ids in sets.items():
            (main / f"{cls}_{split}.txt").write_text(
                "".join(f"{i} {devkit.get((cls, i), -1):2d}\n" for i in ids))
    return main


def test_voc2007_layout_follows_the_devkit_ground_truth(tmp_path):
    main = fake_voc2007(tmp_path)
    ds = build_dataset("voc2007", root=tmp_path)
    assert ds.class_names() == VOC and ds.info.multilabel
    assert ds.info.num_classes == 20 and ds.info.metric == "map11"
    assert ds.counts() == {"train": 3, "val": 3, "trainval": 6, "test": 5}
    for split in ("trainval", "test"):
        t = ds.targets(split)
        for c, cls in enumerate(VOC):
            gt = [int(line.split()[1]) for line in (main / f"{cls}_{split}.txt").read_text().splitlines()]
            want = [{1: 1.0, -1: 0.0, 0: IGNORE}[g] for g in gt]
            assert t[:, c].tolist() == want, (split, cls)
    _, target = ds.split("test")[1]  # what a DataLoader hands training: the same value
    assert target[VOC.index("dog")].item() == IGNORE and target[VOC.index("person")].item() == 1.0


def test_voc2007_map_ignores_difficult_as_the_devkit(tmp_path):
    """Test scores for dog on 000101…000105: 0.9, 0.8, 0.7, 0.6, 0.5; devkit labels 1, 0, -1, 1, -1.
    The devkit skips 000102: hits at ranks 1 and 3 of 4 → precision 1 up to recall 0.5, then 2/3 →
    AP = (6·1 + 5·2/3) / 11 = 28/33. Counting it positive gives 10/11, negative 17/22."""
    fake_voc2007(tmp_path)
    dog = VOC.index("dog")
    scores = np.zeros((5, 20))
    scores[:, dog] = [0.9, 0.8, 0.7, 0.6, 0.5]
    only_dog = np.zeros(20, bool)
    only_dog[dog] = True

    def dog_ap(**opts) -> float:
        t = build_dataset("voc2007", root=tmp_path, **opts).targets("test")
        t = np.where(only_dog, t, 0.0)  # score only the dog column
        return compute_metric("map11", scores, t)

    assert dog_ap() == pytest.approx(28 / 33)
    assert dog_ap(difficult="positive") == pytest.approx(10 / 11)
    assert dog_ap(difficult="negative") == pytest.approx(17 / 22)
    for bad in ("maybe", True):  # checked when a sweep file is loaded, listing the values
        with pytest.raises(OptionError, match=rf"difficult: {bad!r} is not one of ignore, positive, negative"):
            resolve_options("voc2007", {"difficult": bad})
    assert build_dataset("voc2007", root=tmp_path).fingerprint() != \
        build_dataset("voc2007", root=tmp_path, difficult="positive").fingerprint()


# -------------------------------------------------------------------------------------------- DTD
def test_dtd_layout(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    classes = _names("texture", 47, ["banded", "polka-dotted", "zigzagged"])
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c_i, c in enumerate(classes):
        for k, split in enumerate(["train", "train", "val", "test", "test"]):
            rel = f"{c}/{c}_{k + 1:04d}.jpg"
            _img(base / "images" / rel, c_i)
            rows[split].append(rel)
    (base / "labels").mkdir()
    for p in range(1, 11):  # ten partitions; the paper's is 1
        for split, rels in rows.items():
            chosen = rels if p == 1 else rels[::-1]
            (base / "labels" / f"{split}{p}.txt").write_text("\n".join(chosen) + "\n")
    (base / "labels" / "labels_joint_anno.txt").write_text("".join(f"{r} {r.split('/')[0]}\n" for r in rows["train"]))
    (base / "imdb").mkdir()
    ds = build_dataset("dtd", root=tmp_path)
    _check(ds, "dtd", sorted(classes), {"train": 94, "val": 47, "trainval": 141, "test": 94})


# ---------------------------------------------------------------------------------- Oxford-IIIT Pets
PET_BREEDS = ["Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
              "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx", "american_bulldog",
              "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua", "english_cocker_spaniel",
              "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
              "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug", "saint_bernard", "samoyed",
              "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier"]


def test_oxford_pets_layout(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    breeds = sorted(PET_BREEDS, key=str.lower)  # class ids 1..37 follow this order
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for b_i, breed in enumerate(breeds):
        species = 1 if breed[0].isupper() else 2  # cats are capitalised
        breed_id = sum(1 for b in breeds[:b_i] if (b[0].isupper()) == (species == 1)) + 1
        for k in range(1, 8):
            image_id = f"{breed}_{k}"
            _img(base / "images" / f"{image_id}.jpg", b_i)
            lines["trainval" if k <= 5 else "test"].append(f"{image_id} {b_i + 1} {species} {breed_id}")
    ann = base / "annotations"
    (ann / "trimaps").mkdir(parents=True)
    (ann / "xmls").mkdir()
    for split, rows in lines.items():
        (ann / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (ann / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(lines["trainval"] + lines["test"]))
    ds = build_dataset("oxford_pets", root=tmp_path)
    tr, va = _heldout(5, 37)
    names = [" ".join(p.title() for p in b.split("_")) for b in breeds]
    _check(ds, "oxford_pets", names, {"train": tr, "val": va, "trainval": tr + va, "test": 74})
    assert names[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]


# ------------------------------------------------------------------------------------ Caltech-101
def test_caltech101_layout(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    classes = _names("category", 102, ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes",
                                       "accordion", "airplanes"])
    for c_i, c in enumerate(classes):
        for k in range(1, 33):  # 30 for train (the paper's rule), 2 left for test
            _img(cats / c / f"image_{k:04d}.jpg", c_i)
    (tmp_path / "caltech101" / "Annotations" / "Faces_2").mkdir(parents=True)
    ds = build_dataset("caltech101", root=tmp_path)
    tr, va = _heldout(30, 102)
    _check(ds, "caltech101", sorted(classes), {"train": tr, "val": va, "trainval": tr + va, "test": 204})
    assert np.bincount(ds.targets("trainval")).tolist() == [30] * 102


# ------------------------------------------------------------------------------------ Flowers-102
def test_flowers102_layout(tmp_path, no_md5):
    from torchvision.datasets import Flowers102

    base = tmp_path / "flowers-102"
    labels, sets = [], {"trnid": [], "valid": [], "tstid": []}
    image_id = 0
    for c in range(102):
        for split in ("trnid", "valid", "tstid", "tstid"):
            image_id += 1
            labels.append(c + 1)  # 1-based, as in imagelabels.mat
            sets[split].append(image_id)
            _img(base / "jpg" / f"image_{image_id:05d}.jpg", c)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    scipy.io.savemat(base / "setid.mat", {k: np.array([v]) for k, v in sets.items()})
    ds = build_dataset("flowers102", root=tmp_path)
    _check(ds, "flowers102", list(Flowers102.classes), {"train": 102, "val": 102, "trainval": 204, "test": 204})
    assert ds.targets("val").tolist() == list(range(102))
