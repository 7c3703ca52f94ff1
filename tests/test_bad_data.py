"""Bad data gives one clear line naming the file or folder and the fix — or, with
``skip_bad_images: true``, is skipped and counted. Every file is fabricated in tmp_path."""
from __future__ import annotations

import logging
import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xfer.data import DatasetNotFoundError, build_dataset, dataset_option_names, resolve_options
from xfer.data.folder import BadDataError, BadImageError, image_problem

CLASSES = ("cat", "dog")


def _image(path: Path, fmt: str = "JPEG", seed: int = 0, size: int = 48) -> Path:
    """A real image with noisy content (so a cut-off copy really lacks data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def _tree(base: Path, splits=("train", "test"), classes=CLASSES, n: int = 5) -> Path:
    for s in splits:
        for c_i, c in enumerate(classes):
            for k in range(n):
                _image(base / s / c / f"{k}.jpg", seed=100 * c_i + k)
    return base


def _truncated_jpeg(path: Path) -> None:
    _image(path, "JPEG", seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_png(path: Path) -> None:
    _image(path, "PNG", seed=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(2000))


def _zero_bytes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("label,notes\ncat,this is a spreadsheet saved with an image name\n")


# fault: (file name, how to make it, words the reason must contain)
FAULTS = {
    "random_bytes": ("junk.jpg", _random_bytes, "not an image"),
    "truncated_jpeg": ("half.jpg", _truncated_jpeg, "truncated"),
    "truncated_png": ("half.png", _truncated_png, "truncated"),
    "zero_bytes": ("empty.jpg", _zero_bytes, "empty file (0 bytes)"),
    "text_as_image": ("notes.png", _text, "not an image"),
}


def _one_line(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg


# ------------------------------------------------------------------------------- bad image files
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_image_fails_the_build_naming_file_and_fix(fault, tmp_path):
    fname, make, reason = FAULTS[fault]
    _tree(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "cat" / fname
    make(bad)
    with pytest.raises(BadImageError) as err:
        build_dataset("imagefolder", root=tmp_path, path="d")
    e = err.value
    msg = str(e)
    _one_line(msg)
    assert str(bad) in msg and reason in msg
    assert "skip_bad_images: true" in msg and "replace or remove it" in msg
    assert e.path == str(bad) and reason in (e.reason or "")
    # what the CLI prints as `error: ...` (it catches FileNotFoundError), and what callers caught before
    assert isinstance(e, DatasetNotFoundError) and isinstance(e, FileNotFoundError) and isinstance(e, ValueError)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_image_in_a_manifest_is_named_too(fault, tmp_path):
    fname, make, reason = FAULTS[fault]
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for c in CLASSES:
            for k in range(3):
                _image(tmp_path / "m" / split / c / f"{k}.jpg", seed=k)
                rows.append(f"{split}/{c}/{k}.jpg,{c},{split}")
    make(tmp_path / "m" / "test" / "dog" / fname)
    rows.append(f"test/dog/{fname},dog,test")
    (tmp_path / "m" / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BadImageError, match=rf"{re.escape(fname)}: .*{re.escape(reason)}.*skip_bad_images: true"):
        build_dataset("imagefolder", root=tmp_path, manifest="m/list.csv")
    ds = build_dataset("imagefolder", root=tmp_path, manifest="m/list.csv", skip_bad_images=True)
    assert ds.num_skipped == 1 and ds.skipped_images[0].path.endswith(fname)
    assert ds.counts()["test"] == 6


def test_missing_file_in_a_manifest_is_named(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    (tmp_path / "list.csv").write_text("path,label,split\na.jpg,x,train\nb.jpg,x,test\ngone.jpg,x,test\n")
    with pytest.raises(BadImageError, match=r"gone\.jpg: file not found"):
        build_dataset("imagefolder", root=tmp_path, manifest="list.csv")
    with pytest.raises(BadImageError, match=r"gone\.jpg: file not found"):
        build_dataset("imagefolder", root=tmp_path, manifest="list.csv", verify=False)


def test_several_bad_files_name_the_first_and_count_the_rest(tmp_path):
    _tree(tmp_path / "d")
    for i, (fname, make, _) in enumerate(FAULTS.values()):
        make(tmp_path / "d" / ("train" if i % 2 else "test") / CLASSES[i % 2] / fname)
    with pytest.raises(BadImageError, match=r"\(4 more bad files found too\)") as err:
        build_dataset("imagefolder", root=tmp_path, path="d")
    _one_line(str(err.value))


def test_skip_bad_images_skips_counts_and_logs_once(tmp_path, caplog):
    clean = build_dataset("imagefolder", root=tmp_path, path=str(_tree(tmp_path / "clean")))
    _tree(tmp_path / "d")
    bad_files = []
    for i, (fname, make, _) in enumerate(FAULTS.values()):
        path = tmp_path / "d" / ("train" if i % 2 else "test") / CLASSES[i % 2] / fname
        make(path)
        bad_files.append(str(path))
    with caplog.at_level(logging.WARNING, logger="xfer.data.folder"):
        ds = build_dataset("imagefolder", root=tmp_path, path="d", skip_bad_images=True)
    assert ds.num_skipped == len(FAULTS) == 5
    assert sorted(b.path for b in ds.skipped_images) == sorted(bad_files)
    assert ds.counts() == clean.counts() == {"train": 8, "val": 2, "trainval": 10, "test": 10}
    # skipping never renumbers classes; the data left is exactly the clean tree (same fingerprint)
    assert ds.class_names() == clean.class_names() == list(CLASSES)
    assert ds.targets("test").tolist() == clean.targets("test").tolist()
    assert ds.fingerprint() == clean.fingerprint()
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1
    assert "skipped 5 bad image file(s) of 25" in warnings[0]
    assert sum(p in warnings[0] for p in bad_files) == 5  # the first few (5) are listed by name
    for i in range(len(ds.split("trainval"))):  # every kept image reads
        ds.split("trainval")[i]


def test_skip_log_lists_only_the_first_few(tmp_path, caplog):
    _tree(tmp_path / "d")
    for k in range(8):
        _zero_bytes(tmp_path / "d" / "train" / "cat" / f"z{k}.jpg")
    with caplog.at_level(logging.WARNING, logger="xfer.data.folder"):
        ds = build_dataset("imagefolder", root=tmp_path, path="d", skip_bad_images=True)
    assert ds.num_skipped == 8
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 8 bad" in warning and warning.count("z") == 5 and warning.endswith("…")


def test_skip_option_is_registered_and_typed():
    for name in ("imagefolder", "birdsnap"):
        assert {"skip_bad_images", "verify", "verify_full", "drop_empty_classes"} <= dataset_option_names(name)
    assert resolve_options("imagefolder", {"skip_bad_images": True})["skip_bad_images"] is True
    with pytest.raises(ValueError, match="skip_bad_images.*expected bool"):
        resolve_options("imagefolder", {"skip_bad_images": "yes"})
    with pytest.raises(ValueError, match=r"skip_bad_image: unknown key \(did you mean 'skip_bad_images'"):
        resolve_options("imagefolder", {"skip_bad_image": True})


# ------------------------------------------------------------------- cheap vs full vs lazy checks
def test_cheap_check_misses_mid_file_corruption_verify_full_catches_it(tmp_path):
    _tree(tmp_path / "d")
    bad = _image(tmp_path / "d" / "train" / "dog" / "flipped.png", "PNG", seed=3)
    data = bytearray(bad.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 200] = bytes(b ^ 0xFF for b in data[mid:mid + 200])  # header and IEND intact
    bad.write_bytes(bytes(data))
    assert image_problem(bad) is None and image_problem(bad, full=True)
    ds = build_dataset("imagefolder", root=tmp_path, path="d")  # passes the cheap check ...
    with pytest.raises(BadImageError, match=r"flipped\.png: cannot decode") as err:  # ... fails on first read
        for i in range(len(ds.split("trainval"))):
            ds.split("trainval")[i]
    assert "verify_full: true" in str(err.value)
    with pytest.raises(BadImageError, match=r"flipped\.png: cannot decode.*skip_bad_images: true"):
        build_dataset("imagefolder", root=tmp_path, path="d", verify_full=True)
    full = build_dataset("imagefolder", root=tmp_path, path="d", verify_full=True, skip_bad_images=True)
    assert full.num_skipped == 1


def test_lazy_read_error_is_one_line_from_a_dataloader_worker(tmp_path):
    _tree(tmp_path / "d", n=2)
    _truncated_jpeg(tmp_path / "d" / "test" / "cat" / "0.jpg")
    ds = build_dataset("imagefolder", root=tmp_path, path="d", verify=False)  # no build-time check
    with pytest.raises(BadImageError, match=r"test/cat/0\.jpg: truncated"):
        ds.split("test")[0]
    loader = torch.utils.data.DataLoader(ds.split("test"), batch_size=2, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(BadImageError) as err:
        for _ in loader:
            pass
    msg = str(err.value)
    _one_line(msg)
    assert "test/cat/0.jpg: truncated" in msg and "DataLoader worker" in msg


def test_bad_image_error_survives_pickling():
    e = BadImageError("/data/x.jpg", "empty file (0 bytes)")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is BadImageError and str(e2) == str(e) and e2.path == "/data/x.jpg"


# --------------------------------------------------------------------------------- class folders
def test_empty_class_folder_is_named_and_dropped_only_on_request(tmp_path):
    _tree(tmp_path / "d", classes=("ant", "cat", "dog"))
    for f in (tmp_path / "d" / "train" / "ant").iterdir():
        f.unlink()
    for opts in ({}, {"skip_bad_images": True}):  # skipping bad images never drops a class
        with pytest.raises(BadDataError) as err:
            build_dataset("imagefolder", root=tmp_path, path="d", **opts)
        msg = str(err.value)
        _one_line(msg)
        assert f"train class folder {tmp_path / 'd' / 'train' / 'ant'} has no usable images" in msg
        assert "drop_empty_classes: true" in msg
    ds = build_dataset("imagefolder", root=tmp_path, path="d", drop_empty_classes=True)
    assert ds.dropped_classes == ("ant",)
    # indices: the sorted remaining training classes; ant's test images go with it
    assert ds.class_names() == ["cat", "dog"] and ds.info.num_classes == 2
    assert ds.counts()["test"] == 10 and sorted(set(ds.targets("test").tolist())) == [0, 1]


def test_class_whose_images_are_all_bad_says_so(tmp_path):
    _tree(tmp_path / "d", classes=("ant", "cat", "dog"), n=3)
    for f in (tmp_path / "d" / "train" / "dog").iterdir():
        _zero_bytes(f)
    with pytest.raises(BadDataError, match=r"train/dog has no usable images \(3 bad file\(s\) in it were skipped\)"):
        build_dataset("imagefolder", root=tmp_path, path="d", skip_bad_images=True)
    ds = build_dataset("imagefolder", root=tmp_path, path="d", skip_bad_images=True, drop_empty_classes=True)
    assert ds.num_skipped == 3 and ds.dropped_classes == ("dog",) and ds.class_names() == ["ant", "cat"]


def test_empty_test_class_folder(tmp_path):
    _tree(tmp_path / "d")
    (tmp_path / "d" / "test" / "cat").mkdir(exist_ok=True)
    for f in (tmp_path / "d" / "test" / "cat").iterdir():
        f.unlink()
    with pytest.raises(BadDataError, match=r"test class folder .*test/cat has no usable images"):
        build_dataset("imagefolder", root=tmp_path, path="d")
    ds = build_dataset("imagefolder", root=tmp_path, path="d", drop_empty_classes=True)
    assert ds.class_names() == list(CLASSES) and ds.dropped_classes == () and ds.counts()["test"] == 5


# ------------------------------------------------------------------------- unseen classes (manifest)
@pytest.mark.parametrize("split", ["test", "val"])
def test_manifest_class_unseen_in_training_names_class_and_split(split, tmp_path):
    rows = ["path,label,split"]
    for k in range(4):
        _image(tmp_path / f"cat{k}.jpg", seed=k)
        rows.append(f"cat{k}.jpg,cat,{'train' if k < 2 else 'test'}")
    _image(tmp_path / "owl.jpg", seed=9)
    rows.append(f"owl.jpg,owl,{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BadDataError) as err:
        build_dataset("imagefolder", root=tmp_path, manifest="list.csv")
    msg = str(err.value)
    _one_line(msg)
    assert f"manifest {tmp_path / 'list.csv'}" in msg
    assert f"{split} has classes with no training images: owl" in msg and f"split {split!r}" in msg
    assert "add training images for them" in msg
    with pytest.raises(BadDataError, match="owl"):  # not something skipping or dropping hides
        build_dataset("imagefolder", root=tmp_path, manifest="list.csv", skip_bad_images=True,
                      drop_empty_classes=True)


# --------------------------------------------------------------------------------- missing roots
def test_missing_image_folder_says_where_and_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("imagefolder", root=tmp_path, path="mine")
    msg = str(err.value)
    _one_line(msg)
    assert f"image folder {tmp_path / 'mine'} does not exist" in msg
    assert f"{tmp_path / 'mine'}/train/<class>/*.jpg" in msg and "set the dataset option `path`" in msg
    assert f"data_root, here {tmp_path}" in msg


def test_missing_manifest_says_where_and_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("imagefolder", root=tmp_path, manifest="lists/mine.csv")
    msg = str(err.value)
    _one_line(msg)
    assert f"manifest {tmp_path / 'lists' / 'mine.csv'} does not exist" in msg
    assert "columns path,label,split" in msg and "set the dataset option `manifest`" in msg


@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py"), ("food101", "food-101"),
                                           ("dtd", "dtd/dtd")])
def test_missing_torchvision_dataset_says_where_and_to_download(name, expected, tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=tmp_path)
    msg = str(err.value)
    _one_line(msg)
    assert msg.startswith(f"{name}: dataset files not found under {tmp_path / expected}")
    assert "set `download: true`" in msg and "download=True to download it" not in msg


def test_torchvision_dataset_that_cannot_download_gives_manual_steps(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("stanford_cars", root=tmp_path)
    msg = str(err.value)
    _one_line(msg)
    assert str(tmp_path / "stanford_cars") in msg and "mirror" in msg and "download: true" not in msg


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cifar10", root=tmp_path, download=True)
    msg = str(err.value)
    _one_line(msg)
    assert f"could not fetch or read the dataset under {tmp_path / 'cifar-10-batches-py'}" in msg
    assert "name resolution" in msg and f"fetch the files yourself into {tmp_path / 'cifar-10-batches-py'}" in msg
