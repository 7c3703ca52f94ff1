"""Where a sweep keeps its files: one object names every folder and file under the storage root.

Trial processes may run in another working directory (Tune moves into trial folders; a Ray job unpacks
its working dir elsewhere), so every path here is absolute. Names that come from a spec (sweep names)
are checked so that they can never point outside the root.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Free space a sweep needs before it starts (spec ``min_free_space``, ``xfer sweep --min-free``): a few
# periodic checkpoints (model + optimizer, the last two kept), features and predictions of a real study.
DEFAULT_MIN_FREE = 256 << 20

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class LayoutError(ValueError):
    """A name that would escape the storage root or is not a plain file name."""


def safe_name(name: str, what: str = "name") -> str:
    """``name`` if it is a plain file name (letters, digits, ``_ . -``, not starting with a dot)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise LayoutError(f"{what} {name!r} cannot be used as a folder name: use letters, digits, '_', '.', '-' "
                          "(not starting with '.' and without '..')")
    return name


@dataclass(frozen=True)
class StorageLayout:
    """The storage root (checkpoints, features, predictions, Ray state, reports) and the data root.

    ``storage``/``data_root`` are made absolute on construction.
    """

    storage: Path
    data_root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", Path(self.storage).expanduser().resolve())
        object.__setattr__(self, "data_root", Path(self.data_root).expanduser().resolve())

    # -- per trial key -------------------------------------------------------------------------
    def checkpoint_dir(self, key: str) -> Path:
        """Source-training output of one pretrain trial (``model.pth`` + ``meta.json``)."""
        return self.storage / "checkpoints" / safe_name(key, "trial key")

    def work_dir(self, key: str) -> Path:
        """A trial's periodic checkpoint for exact resume (removed once its result is final)."""
        return self.storage / "trials" / safe_name(key, "trial key")

    def predictions(self, key: str) -> Path:
        """A final run's per-example test outputs (one folder per key keeps the schema's file name)."""
        return self.storage / "predictions" / safe_name(key, "trial key") / "predictions.npz"

    # -- shared --------------------------------------------------------------------------------
    @property
    def features_dir(self) -> Path:
        return self.storage / "features"

    def feature_file(self, key: str) -> Path:
        return self.features_dir / f"{safe_name(key, 'feature key')}.pt"

    @property
    def image_cache_dir(self) -> Path:
        """Decoded images of dataset pools, shared by every trial (``xfer.data.cache``)."""
        return self.storage / "image_cache"

    def image_cache(self, key: str) -> Path:
        """One pool's decoded images at one resolution (``images.npy``, ``meta.npz``, ``manifest.json``)."""
        return self.image_cache_dir / safe_name(key, "image cache key")

    @property
    def calibration_dir(self) -> Path:
        """Measured trial speeds per network, batch and device (``xfer plan --calibrate``; ``xfer.cost``).
        Not one of ``folders()``: a sweep reads it, only ``xfer plan --calibrate`` writes it."""
        return self.storage / "calibration"

    @property
    def ray(self) -> Path:
        """Ray Tune's experiment state (what ``--resume`` restores)."""
        return self.storage / "ray"

    def journal_dir(self, sweep: str) -> Path:
        """Results waiting for the tracking server (``xfer.tracking.journal``)."""
        return self.storage / "journal" / safe_name(sweep, "sweep name")

    def report_dir(self, sweep: str) -> Path:
        return self.storage / "reports" / safe_name(sweep, "sweep name")

    # -- checks --------------------------------------------------------------------------------
    def folders(self) -> tuple[Path, ...]:
        """Every top-level folder a sweep writes under the storage root."""
        s = self.storage
        return (s / "checkpoints", s / "trials", s / "predictions", self.features_dir, self.image_cache_dir, self.ray,
                s / "reports", s / "journal")

    def preflight(self, min_free: int = DEFAULT_MIN_FREE) -> int:
        """Before any trial starts: the storage root and each of its folders take a probe file, and at
        least ``min_free`` bytes are free — else ``xfer.io.StorageError`` naming the path, the free space
        and what is needed. Returns the free bytes."""
        from xfer.io import check_storage

        return check_storage(self.storage, self.folders(), min_free=min_free)
