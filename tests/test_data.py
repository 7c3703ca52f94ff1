"""The dataset registry: split rules, one shared contract for every offline dataset, the paper's
torchvision-backed datasets on files fabricated here, user image folders / manifests, transforms."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from xfer import data
from xfer.data import DATASETS, DatasetNotFoundError, build_dataset, build_from_ref, dataset_option_names
from xfer.data.folder import ImageReadError
from xfer.data.splits import per_class_sample, stratified_holdout
from xfer.metrics import IGNORE
from xfer.data.transforms import DataConfig, eval_transform, train_transform
from xfer.registry import UnknownNameError

# every registered dataset that makes its own data (an image folder needs the user's files)
OFFLINE = [n for n in DATASETS.names() if DATASETS.get(n).info.offline and DATASETS.get(n).cache]
SMALL = {"train_per_class": 12, "test_per_class": 4}  # for rebuilding synthetic tasks cheaply


def _fresh(name: str, **options):
    """Build bypassing the in-process cache (to check determinism across builds)."""
    entry = DATASETS.get(name)
    return entry.builder(name=name, root=Path("."), download=False, **data.resolve_options(name, options))


def _jpeg(path: Path, colour=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


# ----------------------------------------------------------------------------------- split rules
def test_stratified_holdout_is_deterministic_stratified_and_disjoint():
    y = np.repeat(np.arange(5), [10, 20, 3, 1, 50])
    tr, va = stratified_holdout(y, 0.2, seed=3)
    tr2, va2 = stratified_holdout(y, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == list(range(len(y)))
    for c, n in enumerate([10, 20, 3, 1, 50]):
        n_val = int(np.sum(y[va] == c))
        assert n_val == min(round(0.2 * n), n - 1)
        assert np.sum(y[tr] == c) >= 1  # every class keeps a training example
    tr3, va3 = stratified_holdout(y, 0.2, seed=4)
    assert not np.array_equal(va, va3)


def test_stratified_holdout_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        stratified_holdout([0, 1], 1.5)
    with pytest.raises(ValueError, match="one integer label"):
        stratified_holdout(np.zeros((4, 3), int), 0.2)


def test_per_class_sample_takes_k_per_class():
    y = np.repeat(np.arange(4), [40, 31, 35, 50])
    picked, rest = per_class_sample(y, 30, seed=0)
    assert [int(np.sum(y[picked] == c)) for c in range(4)] == [30, 30, 30, 30]
    assert len(picked) + len(rest) == len(y) and not set(picked) & set(rest)
    assert np.array_equal(picked, per_class_sample(y, 30, seed=0)[0])
    assert not np.array_equal(picked, per_class_sample(y, 30, seed=1)[0])
    with pytest.raises(ValueError, match=">= 1"):
        per_class_sample(y, 0)


# ------------------------------------------------------------------------------------- registry
PAPER = {  # the paper's table: classes, metric, validation rule
    "food101": (101, "top1", "heldout"), "cifar10": (10, "top1", "heldout"),
    "cifar100": (100, "top1", "heldout"), "birdsnap": (500, "top1", "heldout"),
    "sun397": (397, "top1", "heldout"), "stanford_cars": (196, "top1", "heldout"),
    "fgvc_aircraft": (100, "mean_per_class", "official"), "voc2007": (20, "map11", "official"),
    "dtd": (47, "top1", "official"), "oxford_pets": (37, "mean_per_class", "heldout"),
    "caltech101": (102, "mean_per_class", "per_class_30"), "flowers102": (102, "mean_per_class", "official"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_datasets_are_registered_with_the_protocol(name):
    info = DATASETS.get(name).info
    assert (info.num_classes, info.metric, info.val_rule) == PAPER[name]
    assert info.multilabel == (name == "voc2007")
    assert not info.offline


def test_unknown_dataset_and_option_errors():
    with pytest.raises(UnknownNameError, match="Did you mean 'cifar10'"):
        build_dataset("cifar-10", root=".")
    with pytest.raises(ValueError, match=r"num_class: unknown key \(did you mean 'num_classes'\?\); valid keys: .*num_classes"):
        build_dataset("synthetic_near", root=".", num_class=3)
    with pytest.raises(ValueError, match="expected int"):
        build_dataset("synthetic_near", root=".", num_classes="ten")
    with pytest.raises(ValueError, match="distance"):
        build_dataset("synthetic", root=".", distance=1.5, **SMALL)
    assert "download" in dataset_option_names("cifar10")
    assert "download" not in dataset_option_names("synthetic_near")
    assert {"num_classes", "distance", "seed"} <= dataset_option_names("synthetic")


def test_build_from_ref_reads_the_given_data_root(tmp_path):
    from xfer.trial import DatasetRef

    ds = build_from_ref(DatasetRef("synthetic_far", {"train_per_class": 12, "test_per_class": 4}), data_root=tmp_path)
    assert ds.counts()["test"] == 40
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):  # the reference's download option wins
        build_from_ref(DatasetRef("cifar10", {"download": False}), data_root=tmp_path, download=True)


# ---------------------------------------------------------------------- offline contract (shared)
@pytest.mark.parametrize("name", OFFLINE)
def test_offline_dataset_contract(name):
    ds = build_dataset(name, root=".")
    assert build_dataset(name, root=".") is ds  # cached in-process
    info, counts = ds.info, ds.counts()
    assert info.offline and info.metric == "top1" and not info.multilabel
    assert counts["train"] + counts["val"] == counts["trainval"]
    assert all(counts[s] > 0 for s in ("train", "val", "test"))
    for s in data.SPLITS:
        assert len(ds.split(s)) == counts[s]
    assert len(ds.class_names()) == info.num_classes

    # trainval is train then val, and test shares no example with it
    parts = {s: ds.parts(s) for s in data.SPLITS}
    assert parts["trainval"] == parts["train"] + parts["val"]
    used = {(pool, int(i)) for s in ("train", "val") for pool, idx in parts[s] for i in idx}
    assert len(used) == counts["trainval"]  # train and val are disjoint
    assert not used & {(pool, int(i)) for pool, idx in parts["test"] for i in idx}
    tv, tr, va = ds.split("trainval"), ds.split("train"), ds.split("val")
    assert torch.equal(tv[0][0], tr[0][0]) and torch.equal(tv[counts["train"]][0], va[0][0])

    # items: 32x32 RGB uint8, targets in range, every class in train, val and test
    x, y = ds.split("test")[len(ds.split("test")) - 1]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 32, 32) and isinstance(y, int)
    for s in ("train", "val", "test"):
        t = ds.targets(s)
        assert len(t) == counts[s] and t.min() >= 0 and t.max() < info.num_classes
        assert len(np.unique(t)) == info.num_classes
    assert float(x.float().std()) > 5  # not a blank image

    # determinism across builds, fingerprint stable and sensitive to options
    options = SMALL if name.startswith("synthetic") else {}
    a, b = _fresh(name, **options), _fresh(name, **options)
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(a.split("train")[3][0], b.split("train")[3][0])
    assert [p[1].tolist() for p in a.parts("val")] == [p[1].tolist() for p in b.parts("val")]
    assert a.fingerprint() != _fresh(name, **options, split_seed=1).fingerprint()
    if name.startswith("synthetic"):
        assert a.fingerprint() != ds.fingerprint()
        assert a.fingerprint() != _fresh(name, **{**options, "seed": 7}).fingerprint()


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_distance_controls_far_primitives_and_targets_are_new_tasks():
    src = build_dataset("synthetic_source", root=".")
    near = build_dataset("synthetic_near", root=".")
    far = build_dataset("synthetic_far", root=".")
    frac = lambda ds: np.mean([p.startswith("far-") for n in ds.class_names() for p in n.split(" + ")])  # noqa: E731
    assert frac(src) == 0.0
    assert 0.0 < frac(near) < 0.5 < frac(far)
    source_sets = {frozenset(n.split(" + ")) for n in src.class_names()}
    for target in (near, far):
        assert not source_sets & {frozenset(n.split(" + ")) for n in target.class_names()}
    assert src.info.num_classes >= 40


def test_synthetic_train_images_do_not_depend_on_test_size():
    a = _fresh("synthetic_near", train_per_class=10, test_per_class=3)
    b = _fresh("synthetic_near", train_per_class=10, test_per_class=9)
    assert torch.equal(a.split("trainval")[17][0], b.split("trainval")[17][0])
    assert a.counts()["test"] == 30 and b.counts()["test"] == 90


def test_synthetic_classes_live_in_content_not_pixel_positions():
    """A class is *what* is drawn: translation-invariant spectrum features separate the classes far
    better than raw pooled pixels (which would make transfer pointless)."""
    from sklearn.linear_model import LogisticRegression

    ds = build_dataset("synthetic_near", root=".")

    def features(split):
        x = torch.stack([ds.split(split)[i][0] for i in range(len(ds.split(split)))]).float() / 255
        pixels = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        grey = x.mean(1)
        spec = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs()
        spec = torch.log1p(torch.nn.functional.avg_pool2d(spec[:, None], 2).flatten(1))
        return pixels.numpy(), spec.numpy(), ds.targets(split)

    px_tr, sp_tr, y_tr = features("trainval")
    px_te, sp_te, y_te = features("test")
    acc_px = LogisticRegression(C=0.1, max_iter=1000).fit(px_tr, y_tr).score(px_te, y_te)
    acc_sp = LogisticRegression(C=0.1, max_iter=1000).fit(sp_tr, y_tr).score(sp_te, y_te)
    assert acc_sp > acc_px + 0.15 and acc_sp > 0.35, (acc_px, acc_sp)
    assert acc_sp < 0.95  # not trivially solved by a fixed feature map either


# -------------------------------------------------------------------------------------- transforms
CFG = DataConfig(input_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic", crop_pct=0.875)


@pytest.mark.parametrize("kind", ["pil", "tensor", "grey"])
def test_transforms_shape_dtype_normalisation(kind):
    value = 128
    if kind == "pil":
        img = Image.new("RGB", (40, 30), (value,) * 3)
    elif kind == "grey":
        img = Image.new("L", (40, 30), value)
    else:
        img = torch.full((3, 30, 40), value, dtype=torch.uint8)
    for tf in (train_transform(CFG), eval_transform(CFG)):
        out = tf(img)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and tuple(out.shape) == (3, 24, 24)
        expected = (value / 255 - torch.tensor(CFG.mean)) / torch.tensor(CFG.std)
        assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-3)


def test_eval_transform_is_deterministic_and_train_transform_is_random():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
    ev = eval_transform(CFG)
    assert torch.equal(ev(img), ev(img))
    tr = train_transform(CFG)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert CFG.resize_size == 27


def test_data_config_errors():
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'.*bicubic"):
        DataConfig(32, (0.5,) * 3, (0.5,) * 3, interpolation="cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        DataConfig(32, (0.5,) * 3, (0.5,) * 3, crop_pct=1.5)


# ------------------------------------------------------------------ torchvision datasets on fake files
@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks archive MD5s; files fabricated here can only be checked for existence."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(flowers, "check_integrity", exists)


def test_cifar10_from_pickled_batches(tmp_path, no_md5):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        y = [(j + i) % 10 for j in range(20)]
        batches[fname] = (x, y)
        with open(base / fname, "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)

    ds = build_dataset("cifar10", root=tmp_path)
    assert ds.counts() == {"train": 80, "val": 20, "trainval": 100, "test": 20}
    assert ds.class_names()[3] == "class3"
    assert [int(np.sum(ds.targets("val") == c)) for c in range(10)] == [2] * 10  # stratified 20%
    x, y = ds.split("test")[5]
    assert x.dtype == torch.uint8 and torch.equal(x.flatten(), torch.from_numpy(batches["test_batch"][0][5]))
    assert y == batches["test_batch"][1][5]
    assert ds.fingerprint() == build_dataset("cifar10", root=tmp_path).fingerprint()
    assert ds.fingerprint() != build_dataset("cifar10", root=tmp_path, split_seed=1).fingerprint()
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "cifar-10-batches-py", moved / "cifar-10-batches-py")
    assert build_dataset("cifar10", root=moved).fingerprint() == ds.fingerprint()  # root-independent


def test_dtd_official_partition(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    classes = ["banded", "dotted", "zigzagged"]
    lists = {"train": [], "val": [], "test": []}
    for c_i, c in enumerate(classes):
        for k in range(6):
            rel = f"{c}/{c}_{k:04d}.jpg"
            _jpeg(base / "images" / rel, colour=(40 * c_i, 100, 20 * k))
            lists[["train", "train", "val", "test", "test", "test"][k]].append(rel)
    (base / "labels").mkdir()
    for split, rows in lists.items():
        # the val file misses a class on purpose: indices must still follow the folder names
        rows = [r for r in rows if not (split == "val" and r.startswith("banded"))]
        (base / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
    ds = build_dataset("dtd", root=tmp_path)
    assert ds.counts() == {"train": 6, "val": 2, "trainval": 8, "test": 9}
    assert ds.class_names() == classes and ds.info.num_classes == 3
    assert sorted(set(ds.targets("val").tolist())) == [1, 2]
    img, y = ds.split("val")[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and y == 1


def test_flowers102_from_mat_files(tmp_path, no_md5):
    base = tmp_path / "flowers-102"
    n = 12
    labels = np.array([1, 1, 2, 2, 3, 3, 1, 2, 3, 1, 2, 3])  # 1-based, as in imagelabels.mat
    for i in range(1, n + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", colour=(10 * i, 0, 0))
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1, 3, 5, 7]]), "valid": np.array([[2, 4, 6]]),
                                           "tstid": np.array([[8, 9, 10, 11, 12]])})
    ds = build_dataset("flowers102", root=tmp_path)
    assert ds.counts() == {"train": 4, "val": 3, "trainval": 7, "test": 5}
    assert ds.targets("train").tolist() == [0, 1, 2, 0]
    assert ds.targets("test").tolist() == [1, 2, 0, 1, 2]
    assert ds.info.metric == "mean_per_class" and ds.class_names()[0] == "pink primrose"
    img, y = ds.split("trainval")[4]  # val[0] is image 2 (label 1 -> index 0)
    assert y == 0 and img.getpixel((0, 0))[0] == pytest.approx(20, abs=6)


def _voc_xml(objects: list[tuple[str, int]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc2007_multilabel_targets_from_xml(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    anns = {"000001": [("dog", 0), ("person", 0)], "000002": [("cat", 0), ("dog", 1)],
            "000003": [("car", 0)], "000004": [("tvmonitor", 0), ("car", 0), ("car", 0)]}
    for img_id, objs in anns.items():
        _jpeg(voc / "JPEGImages" / f"{img_id}.jpg")
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{img_id}.xml").write_text(_voc_xml(objs))
    sets = voc / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    for split, ids in {"train": ["000001", "000002"], "val": ["000003"], "test": ["000004"]}.items():
        (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    ds = build_dataset("voc2007", root=tmp_path)
    assert ds.info.multilabel and ds.info.metric == "map11" and ds.info.num_classes == 20
    assert ds.counts() == {"train": 2, "val": 1, "trainval": 3, "test": 1}
    idx = {c: i for i, c in enumerate(ds.class_names())}
    img, t = ds.split("train")[1]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (20,)
    assert set(torch.nonzero(t).flatten().tolist()) == {idx["cat"], idx["dog"]}
    assert t[idx["cat"]] == 1 and t[idx["dog"]] == IGNORE  # only-difficult: neither, as the devkit
    assert ds.split("test")[0][1].sum() == 2  # two cars count once
    strict = build_dataset("voc2007", root=tmp_path, difficult="negative")
    assert set(torch.nonzero(strict.split("train")[1][1]).flatten().tolist()) == {idx["cat"]}
    assert strict.fingerprint() != ds.fingerprint()


def test_caltech101_thirty_per_class_rule_and_background(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for c in ["BACKGROUND_Google", "Faces", "accordion"]:
        for k in range(1, 8):
            _jpeg(cats / c / f"image_{k:04d}.jpg")
    ds = build_dataset("caltech101", root=tmp_path, train_per_class=5)
    assert ds.class_names() == ["BACKGROUND_Google", "Faces", "accordion"]
    assert ds.counts() == {"train": 12, "val": 3, "trainval": 15, "test": 6}
    assert [int(np.sum(ds.targets("trainval") == c)) for c in range(3)] == [5, 5, 5]
    no_bg = build_dataset("caltech101", root=tmp_path, train_per_class=5, background=False)
    assert no_bg.class_names() == ["Faces", "accordion"]


def test_sun397_uses_partition_files(tmp_path):
    base = tmp_path / "SUN397"
    (base).mkdir()
    (base / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    files = {c: [f"/{c[0]}/{c}/sun_{c}{k}.jpg" for k in range(4)] for c in ("abbey", "beach")}
    for rels in files.values():
        for rel in rels:
            _jpeg(base / rel.lstrip("/"))
    (base / "Partitions").mkdir()
    (base / "Partitions" / "Training_01.txt").write_text("\n".join(files["abbey"][:3] + files["beach"][:3]))
    (base / "Partitions" / "Testing_01.txt").write_text("\n".join(files["abbey"][3:] + files["beach"][3:]))
    ds = build_dataset("sun397", root=tmp_path)
    assert ds.counts() == {"train": 4, "val": 2, "trainval": 6, "test": 2}
    assert ds.class_names() == ["abbey", "beach"] and ds.targets("test").tolist() == [0, 1]


@pytest.mark.parametrize("name", sorted(n for n in PAPER if n != "birdsnap"))
def test_missing_files_without_download_give_a_clear_error(name, tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert name in msg and str(tmp_path) in msg
    assert "download: true" in msg or "mirror" in msg  # Stanford Cars: manual instructions


def test_birdsnap_missing_manifest_explains_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"birdsnap/manifest\.csv.*get_birdsnap\.py"):
        build_dataset("birdsnap", root=tmp_path)


# ----------------------------------------------------------------------------- folders / manifests
def _tree(base: Path, splits=("train", "test"), classes=("cat", "dog"), n=5) -> None:
    for s in splits:
        for c_i, c in enumerate(classes):
            for k in range(n):
                _jpeg(base / s / c / f"{k}.jpg", colour=(100 * c_i, 10 * k, 50))


def test_imagefolder_heldout_and_official_val(tmp_path):
    _tree(tmp_path / "pets")
    ds = build_dataset("imagefolder", root=tmp_path, path="pets")  # relative to the data root
    assert ds.info.val_rule == "heldout" and ds.class_names() == ["cat", "dog"]
    assert ds.counts() == {"train": 8, "val": 2, "trainval": 10, "test": 10}
    img, y = ds.split("test")[7]
    assert isinstance(img, Image.Image) and y == 1
    _tree(tmp_path / "withval", splits=("train", "val", "test"))
    off = build_dataset("imagefolder", root=tmp_path, path=str(tmp_path / "withval"), metric="mean_per_class")
    assert off.info.val_rule == "official" and off.info.metric == "mean_per_class"
    assert off.counts() == {"train": 10, "val": 10, "trainval": 20, "test": 10}


def test_imagefolder_fingerprint_follows_content_not_location(tmp_path):
    _tree(tmp_path / "a")
    fp = build_dataset("imagefolder", root=tmp_path, path="a").fingerprint()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert build_dataset("imagefolder", root=tmp_path, path="b").fingerprint() == fp
    _jpeg(tmp_path / "b" / "train" / "dog" / "extra.jpg")
    assert build_dataset("imagefolder", root=tmp_path, path="b").fingerprint() != fp


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of the options 'path'"):
        build_dataset("imagefolder", root=tmp_path)
    (tmp_path / "bad" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no test/ folder"):
        build_dataset("imagefolder", root=tmp_path, path="bad")
    _tree(tmp_path / "odd", classes=("cat",))
    _jpeg(tmp_path / "odd" / "test" / "owl" / "0.jpg")
    with pytest.raises(ValueError, match="test has classes with no training images: owl"):
        build_dataset("imagefolder", root=tmp_path, path="odd")
    with pytest.raises(ValueError, match="metric"):
        build_dataset("imagefolder", root=tmp_path, path="odd", metric="map11")


def test_manifest_form_and_birdsnap(tmp_path):
    bird = tmp_path / "birdsnap"
    rows = ["path,label,split"]
    for k in range(10):
        for c in ("Acadian_Flycatcher", "Blue_Jay"):
            rel = f"images/{c}/{k}.jpg"
            _jpeg(bird / rel, colour=(k * 20, 0, 0))
            rows.append(f"{rel},{c},{'test' if k >= 7 else 'train'}")
    (bird / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset("birdsnap", root=tmp_path)  # default manifest location
    assert ds.counts() == {"train": 12, "val": 2, "trainval": 14, "test": 6}
    assert ds.class_names() == ["Acadian_Flycatcher", "Blue_Jay"]
    user = build_dataset("imagefolder", root=tmp_path, manifest="birdsnap/manifest.csv")
    assert user.counts() == ds.counts()
    assert ds.split("test")[0][1] == 0

    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\nbirdsnap/images/Blue_Jay/0.jpg,Blue_Jay,holdout\n")
    with pytest.raises(ValueError, match=r"line 2: split 'holdout' is not one of train, val, test"):
        build_dataset("imagefolder", root=tmp_path, manifest=str(bad))
    bad.write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ValueError, match="missing column"):
        build_dataset("imagefolder", root=tmp_path, manifest=str(bad))


def test_corrupt_images_are_named(tmp_path):
    _tree(tmp_path / "c")
    junk = tmp_path / "c" / "train" / "cat" / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="junk.jpg"):  # caught at build time (header check)
        build_dataset("imagefolder", root=tmp_path, path="c")
    junk.unlink()
    good = tmp_path / "c" / "test" / "dog" / "0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    good.write_bytes(good.read_bytes()[:-1500])  # a truncated file: the header is fine, decoding fails
    with pytest.raises(ImageReadError, match=r"test/dog/0\.jpg: truncated"):  # no JPEG end marker: decoded
        build_dataset("imagefolder", root=tmp_path, path="c")
    ds = build_dataset("imagefolder", root=tmp_path, path="c", verify=False)  # left to the lazy check
    loader = torch.utils.data.DataLoader(ds.split("test"), batch_size=4, collate_fn=lambda b: b)
    with pytest.raises(ImageReadError, match=r"bad image .*test/dog/0\.jpg: truncated"):
        for _ in loader:
            pass
