"""The decoded-image cache (xfer/data/cache.py): written once and atomically, reused, keyed by content and
resolution, verified (a corrupt cache is detected and rebuilt), mapped read-only."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from xfer.data import build_dataset
from xfer.data import cache as C
from xfer.data.transforms import DataConfig
from xfer.layout import StorageLayout


def _write_folder(root, sizes=((40, 30), (24, 50), (33, 33)), classes=("a", "b")):
    """A tiny image folder: train/<class>/ and test/<class>/ with images of the given (w, h) sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k, (w, h) in enumerate(sizes if split == "train" else sizes[:1]):
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
    return root


@pytest.fixture(autouse=True)
def _fresh_memo():
    C.clear_memo()
    yield
    C.clear_memo()


@pytest.fixture
def folder_ds(tmp_path):
    path = _write_folder(tmp_path / "imgs")
    return build_dataset("imagefolder", root=tmp_path, path=str(path))


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = C.decode_into

    def counting(base, images, **kw):
        calls.append(len(images))
        return real(base, images, **kw)

    monkeypatch.setattr(C, "decode_into", counting)
    return calls


def test_cache_is_written_once_and_reused(folder_ds, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    root = tmp_path / "cache"
    first = C.split_images(folder_ds.split("train"), 32, root=root)
    folders = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and sorted(f.name for f in folders[0].iterdir()) == [C.IMAGES, C.MANIFEST, C.META]
    stamp = (folders[0] / C.IMAGES).stat().st_mtime_ns
    C.clear_memo()  # as a new process would: verify and map, never decode again
    again = C.split_images(folder_ds.split("val"), 32, root=root)  # val is held out of the same pool
    also = C.split_images(folder_ds.split("trainval"), 32, root=root)
    assert calls == [6]  # one pool, decoded once
    assert (folders[0] / C.IMAGES).stat().st_mtime_ns == stamp
    assert len(first) + len(again) == len(also) == 6
    np.testing.assert_array_equal(also.gather(np.arange(len(first))), first.gather(np.arange(len(first))))
    # nothing temporary is left behind
    assert [p.name for p in root.iterdir() if ".tmp" in p.name] == []


def test_stored_pixels_are_the_decoded_image_fitted_and_edge_padded(folder_ds, tmp_path):
    split = folder_ds.split("train")
    images = C.split_images(split, 40, root=tmp_path / "cache")
    assert images.side == 40  # the largest long side is 50 > 40: slots are 40 x 40
    for i in range(len(split)):
        pil, target = split[i]
        h, w = images.sizes([i])[0]
        got = images.gather([i])[0]
        ref = np.asarray(pil).transpose(2, 0, 1)
        if max(pil.size) <= 40:  # stored as decoded
            assert (h, w) == (pil.height, pil.width)
            np.testing.assert_array_equal(got[:, :h, :w], ref)
        else:  # long side fitted to 40, aspect kept
            assert max(h, w) == 40 and abs(h / w - pil.height / pil.width) < 0.05
        np.testing.assert_array_equal(got[:, :h, w:], np.repeat(got[:, :h, w - 1:w], 40 - w, axis=2))
        np.testing.assert_array_equal(got[:, h:, :], np.repeat(got[:, h - 1:h, :], 40 - h, axis=1))
        assert images.targets([i])[0] == target


def test_small_images_keep_their_resolution(folder_ds, tmp_path):
    images = C.split_images(folder_ds.split("test"), 256, root=tmp_path / "cache")
    assert images.side == 40  # never enlarged: the pool's largest long side (40 x 30 images), not 256


def test_key_follows_content_and_resolution(tmp_path):
    a = build_dataset("imagefolder", root=tmp_path, path=str(_write_folder(tmp_path / "a")))
    same = build_dataset("imagefolder", root=tmp_path, path=str(_write_folder(tmp_path / "same")))
    other = build_dataset("imagefolder", root=tmp_path, path=str(_write_folder(tmp_path / "b", sizes=((40, 31),))))
    root = tmp_path / "cache"
    names = lambda: {p.name for p in root.iterdir() if not p.name.startswith(".")}  # noqa: E731
    C.split_images(a.split("train"), 32, root=root)
    assert len(names()) == 1
    C.split_images(same.split("train"), 32, root=root)  # same files, other place: the same cache
    assert len(names()) == 1
    C.split_images(a.split("train"), 24, root=root)  # another resolution
    assert len(names()) == 2
    C.split_images(other.split("train"), 32, root=root)  # other content
    assert len(names()) == 3
    assert C.cache_key("x", "train", 32) != C.cache_key("x", "test", 32) != C.cache_key("x", "train", 64)
    assert C.cache_side(DataConfig(224, (0.5,) * 3, (0.2,) * 3)) == 448
    assert C.cache_side(DataConfig(32, (0.5,) * 3, (0.2,) * 3, crop_pct=0.5)) == 64


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_manifest"])
def test_a_corrupt_cache_is_detected_and_rebuilt(folder_ds, tmp_path, monkeypatch, caplog, damage):
    root = tmp_path / "cache"
    good = C.split_images(folder_ds.split("train"), 32, root=root)
    expected = good.gather(np.arange(len(good))).copy()
    folder = next(p for p in root.iterdir() if not p.name.startswith("."))
    path = folder / C.IMAGES
    if damage == "flip_byte":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        (folder / C.MANIFEST).unlink()
    C.clear_memo()
    calls = _count_decodes(monkeypatch)
    with pytest.raises(Exception, match="truncated or corrupted|incomplete"):
        C.open_cached(folder)
    with caplog.at_level(logging.WARNING, logger="xfer.data.cache"):
        again = C.split_images(folder_ds.split("train"), 32, root=root)
    assert calls == [6]
    assert "corrupt image cache" in caplog.text
    np.testing.assert_array_equal(again.gather(np.arange(len(again))), expected)
    C.clear_memo()
    C.open_cached(folder)  # the rebuilt cache verifies


def test_the_cache_is_a_read_only_shared_memory_map(folder_ds, tmp_path):
    root = tmp_path / "cache"
    a = C.split_images(folder_ds.split("train"), 32, root=root)
    C.clear_memo()
    b = C.split_images(folder_ds.split("train"), 32, root=root)
    for images in (a.pools[0].images, b.pools[0].images):
        assert isinstance(images, np.memmap) and images.mode == "r" and not images.flags.writeable
        with pytest.raises(ValueError):
            images[0, 0, 0, 0] = 1
    assert a.pools[0].images.filename == b.pools[0].images.filename  # one file, mapped by both


def test_a_failed_build_leaves_nothing_under_the_final_name(folder_ds, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    real = C._Decoded.__getitem__

    def fail_on_3(self, i):
        if i == 3:
            raise RuntimeError("killed mid-decode")
        return real(self, i)

    monkeypatch.setattr(C._Decoded, "__getitem__", fail_on_3)
    with pytest.raises(RuntimeError, match="killed mid-decode"):
        C.split_images(folder_ds.split("train"), 32, root=root)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(C._Decoded, "__getitem__", real)
    assert len(C.split_images(folder_ds.split("train"), 32, root=root)) == 4  # 6 minus the held-out 2


def test_concurrent_first_uses_decode_once(folder_ds, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    root = tmp_path / "cache"
    results, errors = [], []

    def use():
        try:
            results.append(C.split_images(folder_ds.split("train"), 32, root=root))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and calls == [6]


def test_in_memory_pools_are_used_as_they_are(tmp_path):
    ds = build_dataset("digits", root=tmp_path)
    root = tmp_path / "cache"
    images = C.split_images(ds.split("train"), 64, root=root)
    assert not root.exists()  # nothing to decode, nothing written
    pool = ds._pools["all"]
    assert np.shares_memory(images.pools[0].images, pool.images.numpy())
    idx = [3, 0, 7]
    rows = ds.parts("train")[0][1][idx]
    np.testing.assert_array_equal(images.gather(idx), pool.images.numpy()[rows])
    np.testing.assert_array_equal(images.targets(idx), pool.targets[rows])


def test_a_subset_reads_its_datasets_cache(folder_ds, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    whole = C.split_images(folder_ds.split("train"), 32, root=root)
    calls = _count_decodes(monkeypatch)
    part = C.split_images(Subset(folder_ds.split("train"), [3, 1]), 32, root=root)
    assert calls == []
    np.testing.assert_array_equal(part.gather([0, 1]), whole.gather([3, 1]))


def test_a_plain_dataset_is_decoded_in_memory(tmp_path):
    x = torch.randint(0, 256, (5, 1, 12, 10), dtype=torch.uint8)  # grey, not square: copied into RGB slots
    data = [(x[i], i % 2) for i in range(5)]
    images = C.split_images(data, 64)
    assert images.side == 12 and images.gather([2]).shape == (1, 3, 12, 12)
    np.testing.assert_array_equal(images.gather([2])[0, :, :, :10], x[2].expand(3, -1, -1).numpy())
    assert images.targets([0, 1, 2]).tolist() == [0, 1, 0]


def test_layout_names_the_cache_folder(tmp_path):
    layout = StorageLayout(tmp_path / "s", tmp_path / "d")
    assert layout.image_cache("abc") == layout.image_cache_dir / "abc"
    assert layout.image_cache_dir.parent == layout.storage


def test_views_are_the_slots_without_a_copy(folder_ds, tmp_path):
    images = C.split_images(folder_ds.split("train"), 32, root=tmp_path / "cache")
    views = images.views([2, 0])
    np.testing.assert_array_equal(torch.stack(views).numpy(), images.gather([2, 0]))
    assert all(np.shares_memory(v.numpy(), images.pools[0].images) for v in views)
