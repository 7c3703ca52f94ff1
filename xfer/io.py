"""Atomic file writes: checkpoints, cached features, predictions and pretrain outputs are read by other
processes (resumed trials, other workers on shared storage), so a file under its final name must
always be complete. A crash leaves at most a hidden temporary file."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a unique temporary name beside ``path``, flush it to disk, then move it
    into place with ``os.replace`` (atomic on POSIX: readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` into place atomically (through a file object: torch may not add a suffix)."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, write)


def save_npz(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` into place atomically (a file object: savez would append ``.npz``)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
