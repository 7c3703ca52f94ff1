"""Atomic, checked file writes and storage checks.

Checkpoints, cached features, predictions and pretrain outputs are read by other processes (resumed
trials, other workers on shared storage), so a file under its final name must always be complete. A
crash leaves at most a hidden temporary file; a full or read-only filesystem leaves nothing and raises
``StorageError`` naming the path, the reason and the free space (a bare ``OSError`` from deep inside
``torch.save`` — often a ``RuntimeError`` wrapping one — does not say which of a sweep's files failed).

Files that a later run *trusts* (periodic training checkpoints) get a SHA-256 sidecar ``<file>.sha256``
(``sha256sum -c`` format) so that truncation or bit rot is detected before the file is loaded.
"""
from __future__ import annotations

import errno as errno_codes
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

# the errors that mean "this storage cannot take the write" (as opposed to a bug in the writer)
STORAGE_ERRNOS = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EROFS, errno_codes.EACCES,
                            errno_codes.EPERM, errno_codes.EFBIG})
_NEARLY_FULL = 1 << 20  # a non-OSError write failure with less free than this is taken as "disk full"


class StorageError(OSError):
    """The storage cannot take a write (full, read-only, no permission, quota). A user-facing error:
    the message names the path, what went wrong, the free space and what was needed."""

    def __init__(self, code: int, message: str, path: Path | str | None = None) -> None:
        super().__init__(code, message)
        self.filename = str(path) if path is not None else None
        self.message = message

    def __str__(self) -> str:
        return self.message


class ChecksumError(ValueError):
    """A file's SHA-256 does not match the one recorded when it was written (truncated or corrupted)."""


# ------------------------------------------------------------------ sizes and free space
def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'`` (binary units, as ``df -h`` shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from ``512``, ``'300MB'``, ``'2 GiB'``, ``'1.5G'``. K/M/G/T read as binary units whether
    written ``MB`` or ``MiB`` (the safer side for a free-space threshold). ValueError says what is valid."""
    bad = f"{what}: expected a size like 500MB, 2GB, 0 (off) or a number of bytes >= 0, got {value!r}"
    if isinstance(value, bool):
        raise ValueError(bad)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(bad)
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(bad)
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def free_bytes(path: Path) -> int | None:
    """Free space for an unprivileged writer on ``path``'s filesystem (nearest existing parent), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def storage_errno(exc: BaseException, where: Path) -> int | None:
    """The storage errno behind ``exc`` (itself, its cause or context — ``torch.save`` raises a
    RuntimeError whose context is the ENOSPC), or ENOSPC for any other write failure on a filesystem with
    almost nothing left; None when the failure is not the storage's."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        e = e.__cause__ or e.__context__
    if isinstance(exc, Exception):
        free = free_bytes(where)
        if free is not None and free < _NEARLY_FULL:
            return errno_codes.ENOSPC
    return None


def storage_error(code: int, path: Path, *, needed: int | None = None, written: int | None = None,
                  doing: str = "writing") -> StorageError:
    """The one message format for a storage fault: reason, path, free space, what was needed."""
    free = free_bytes(path if Path(path).is_dir() else Path(path).parent)  # the filesystem of path itself
    parts = [f"{os.strerror(code).lower()} {doing} {path}"]
    detail = [f"free {human_bytes(free)}" if free is not None else "free space unknown"]
    if needed is not None:
        detail.append(f"needed {human_bytes(needed)}")
    elif written is not None:
        detail.append(f"needed more than the {human_bytes(written)} written before it failed")
    hint = {errno_codes.EROFS: "mount it writable or point storage elsewhere (--storage)",
            errno_codes.EACCES: "fix its permissions or point storage elsewhere (--storage)",
            errno_codes.EPERM: "fix its permissions or point storage elsewhere (--storage)"}.get(
        code, "free some space or point storage elsewhere (--storage)")
    return StorageError(code, f"{parts[0]}: {', '.join(detail)} — {hint}", path)


# ------------------------------------------------------------------ checksums
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    """The sidecar ``<file>.sha256`` beside ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_checksum(path: Path) -> str | None:
    """The SHA-256 recorded in ``path``'s sidecar, or None when it has none (a file written before
    checksums were recorded) or the sidecar is unreadable."""
    try:
        text = checksum_path(path).read_text().split()
    except OSError:
        return None
    return text[0].lower() if text and len(text[0]) == 64 else None


def verify_file(path: Path, expected: str) -> None:
    """ChecksumError unless ``path`` hashes to ``expected`` (the message names the file and its size)."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path} ({Path(path).stat().st_size} bytes) has SHA-256 {actual[:16]}…, not the "
                            f"{expected[:16]}… recorded when it was written: it is truncated or corrupted")


def remove_with_checksum(path: Path) -> None:
    """Remove a file and its sidecar (missing ones are fine)."""
    for p in (Path(path), checksum_path(path)):
        p.unlink(missing_ok=True)


def move_with_checksum(src: Path, dst: Path) -> None:
    """Rename a file and its sidecar (sidecar first: a crash in between leaves a mismatch, which is
    detected, never a file that passes a check it should fail)."""
    side = checksum_path(src)
    if side.exists():
        os.replace(side, checksum_path(dst))
    else:
        checksum_path(dst).unlink(missing_ok=True)
    os.replace(src, dst)


# ------------------------------------------------------------------ atomic writers
def _discard(tmp: Path) -> int | None:
    """Remove a temporary file; its size before removal (None if it never existed)."""
    try:
        size = tmp.stat().st_size
    except OSError:
        return None
    try:
        tmp.unlink()
    except OSError:
        pass
    return size


def write_atomic(path: Path, write: Callable[[Path], None], *, checksum: bool = False) -> str | None:
    """Call ``write(tmp)`` on a unique temporary name beside ``path``, flush it to disk, then move it
    into place with ``os.replace`` (atomic on POSIX: readers see the old file or the whole new one).

    ``checksum``: hash what reached the disk and record it in ``<path>.sha256`` (written before the
    file is moved into place) and return the hex digest. A full or read-only filesystem raises
    ``StorageError`` and leaves neither the temporary file nor anything under ``path``'s name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    digest = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if checksum:
            digest = sha256_file(tmp)
            write_atomic(checksum_path(path), lambda t: t.write_text(f"{digest}  {path.name}\n"))
        os.replace(tmp, path)
    except BaseException as e:
        written = _discard(tmp)
        code = storage_errno(e, path.parent) if isinstance(e, Exception) else None  # not Ctrl-C
        if code is not None and not isinstance(e, StorageError):
            raise storage_error(code, path, written=written) from e
        raise
    return digest


def save_torch(obj: Any, path: Path, *, checksum: bool = False) -> str | None:
    """``torch.save`` into place atomically (through a file object: torch may not add a suffix);
    ``checksum`` as in ``write_atomic``."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write, checksum=checksum)


def save_npz(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` into place atomically (a file object: savez would append ``.npz``)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------ preflight
def check_storage(root: Path, folders: Iterable[Path] = (), *, min_free: int = 0) -> int:
    """Fail fast, before anything starts, if ``root`` cannot take a sweep's files: each of ``root`` and
    ``folders`` must take a probe file (create + fsync + remove), and the filesystem must have at least
    ``min_free`` bytes free. Returns the free bytes; raises ``StorageError`` naming the path."""
    root = Path(root)
    for folder in (root, *folders):
        folder = Path(folder)
        probe = folder / f".xfer-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"xfer")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as e:
            _discard(probe)
            code = e.errno if e.errno in STORAGE_ERRNOS else None
            if code is None:
                raise StorageError(e.errno or 0, f"storage {folder} is not usable: {e.strerror or e} — point "
                                   "storage elsewhere (--storage)", folder) from e
            raise storage_error(code, folder, doing="at storage folder", needed=min_free or None) from e
    free = free_bytes(root)
    if free is not None and free < min_free:
        raise StorageError(errno_codes.ENOSPC,
                           f"not enough free space for the sweep's storage at {root}: free {human_bytes(free)}, "
                           f"needed {human_bytes(min_free)} (min_free_space) — free some space, point storage "
                           "elsewhere (--storage), or lower the threshold (spec 'min_free_space', --min-free)",
                           root)
    return free if free is not None else -1
