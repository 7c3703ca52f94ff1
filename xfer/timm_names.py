"""timm's architecture names, pretrained tags and their preprocessing, without importing timm where a
cached index will do.

Importing timm registers every model family (seconds of start-up); validating a sweep file and
computing trial keys only need names and pretrained configs. The first use builds an index of
``timm.list_models()``, ``timm.list_pretrained()`` and each tag's preprocessing (input size, mean, std,
crop, interpolation), saves it under ``$XFER_CACHE_DIR`` (default ``~/.cache/xfer``) keyed by timm's
version, and every later process reads that file instead. One architecture check for the spec loader
and the model loader.
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


INDEX_VERSION = "2"


def _cfg_entry(cfg) -> dict:
    return {"input_size": int(cfg.input_size[-1]), "mean": list(cfg.mean), "std": list(cfg.std),
            "crop_pct": float(cfg.crop_pct), "interpolation": str(cfg.interpolation)}


def _build() -> dict:
    import timm

    models, pretrained = sorted(timm.list_models()), sorted(timm.list_pretrained())
    configs = {}
    for name in pretrained + models:  # a bare name stands for its default tag
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None:
            configs[name] = _cfg_entry(cfg)
    return {"models": models, "pretrained": pretrained, "configs": configs}


@lru_cache(maxsize=1)
def _index() -> dict:
    version = importlib.metadata.version("timm")
    path = cache_dir() / f"timm-index-v{INDEX_VERSION}-{version}.json"
    try:
        data = json.loads(path.read_text())
        if {"models", "pretrained", "configs"} <= set(data):
            return {"models": frozenset(data["models"]), "pretrained": frozenset(data["pretrained"]),
                    "configs": data["configs"]}
    except (OSError, ValueError):
        pass
    data = _build()
    try:
        write_atomic(path, lambda p: p.write_text(json.dumps(data)))
    except OSError as e:  # a read-only home: the index is only a start-up saving
        log.debug("could not cache timm's model index at %s: %s", path, e)
    return {"models": frozenset(data["models"]), "pretrained": frozenset(data["pretrained"]),
            "configs": data["configs"]}


def preprocessing(arch: str, input_size: int | None = None) -> dict | None:
    """The preprocessing timm's pretrained config gives ``arch`` (a tag, or a bare name's default tag),
    with ``input_size`` overriding its size; None when timm has no config for it."""
    cfg = _index()["configs"].get(arch)
    if cfg is None:
        return None
    return {**cfg, "input_size": int(input_size)} if input_size is not None else dict(cfg)


def check_arch(arch: str, *, pretrained: bool = False) -> None:
    """Raise UnknownArchitectureError for a name timm does not know (with the closest matches), or,
    when ``pretrained``, for a tag (``resnet50.tv_in1k``) timm has no weights for (with those it has)."""
    models, tags = _index()["models"], _index()["pretrained"]
    base = arch.split(".")[0]
    if base not in models:
        close = difflib.get_close_matches(base, sorted(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownArchitectureError(f"unknown timm architecture {arch!r}{hint} (list them with `xfer models --all`)")
    if pretrained and "." in arch and arch not in tags:
        have = sorted(t for t in tags if t.startswith(base + "."))
        raise UnknownArchitectureError(f"timm has no pretrained tag {arch!r}; available: {', '.join(have) or '(none)'}")
