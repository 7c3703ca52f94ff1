"""timm's architecture names and pretrained tags, without importing timm where a cached index will do.

Importing timm registers every model family (seconds of start-up); validating a sweep file only needs
the names. The first check builds an index of ``timm.list_models()`` and ``timm.list_pretrained()``,
saves it under ``$XFER_CACHE_DIR`` (default ``~/.cache/xfer``) keyed by timm's version, and every later
process reads that file instead. One architecture check for the spec loader and the model loader.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from xfer.io import write_atomic

log = logging.getLogger(__name__)


class UnknownArchitectureError(ValueError):
    """An architecture or pretrained tag timm does not have; the message lists close matches."""


def cache_dir() -> Path:
    return Path(os.environ.get("XFER_CACHE_DIR") or Path.home() / ".cache" / "xfer").expanduser()


@lru_cache(maxsize=1)
def _index() -> tuple[frozenset[str], frozenset[str]]:
    version = importlib.metadata.version("timm")
    path = cache_dir() / f"timm-names-{version}.json"
    try:
        data = json.loads(path.read_text())
        return frozenset(data["models"]), frozenset(data["pretrained"])
    except (OSError, ValueError, KeyError):
        pass
    import timm

    models, pretrained = sorted(timm.list_models()), sorted(timm.list_pretrained())
    try:
        write_atomic(path, lambda p: p.write_text(json.dumps({"models": models, "pretrained": pretrained})))
    except OSError as e:  # a read-only home: the index is only a start-up saving
        log.debug("could not cache timm's model names at %s: %s", path, e)
    return frozenset(models), frozenset(pretrained)


def check_arch(arch: str, *, pretrained: bool = False) -> None:
    """Raise UnknownArchitectureError for a name timm does not know (with the closest matches), or,
    when ``pretrained``, for a tag (``resnet50.tv_in1k``) timm has no weights for (with those it has)."""
    models, tags = _index()
    base = arch.split(".")[0]
    if base not in models:
        close = difflib.get_close_matches(base, sorted(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownArchitectureError(f"unknown timm architecture {arch!r}{hint} (list them with `xfer models --all`)")
    if pretrained and "." in arch and arch not in tags:
        have = sorted(t for t in tags if t.startswith(base + "."))
        raise UnknownArchitectureError(f"timm has no pretrained tag {arch!r}; available: {', '.join(have) or '(none)'}")
