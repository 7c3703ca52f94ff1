"""The tracking journal: trial results that are safe on the sweep's storage but not yet in MLflow.

A study runs for days against a tracking server that restarts. The driver writes every final result
here *before* it logs it to MLflow and removes it once MLflow has it, so a server outage (or a driver
killed during one) loses nothing: the next write attempt, the end of the stage, or the next invocation
logs what is waiting. One JSON file per trial key, written atomically; no MLflow, no Ray.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from xfer.io import write_text

log = logging.getLogger(__name__)


class Journal:
    """``<folder>/<trial key>.json`` per result waiting for MLflow (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def put(self, entry: dict[str, Any]) -> None:
        write_text(self.folder / f"{entry['key']}.json", json.dumps(entry, sort_keys=True))

    def remove(self, key: str) -> None:
        (self.folder / f"{key}.json").unlink(missing_ok=True)

    def entries(self) -> list[dict[str, Any]]:
        """Waiting entries, oldest first; an unreadable file (a torn write cannot happen; a hand edit can)
        is reported and left in place."""
        out = []
        for p in sorted(self.folder.glob("*.json"), key=lambda q: q.stat().st_mtime) if self.folder.is_dir() else []:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError) as e:
                log.warning("tracking journal: cannot read %s (%s); left in place", p, e)
        return out

    def keys(self, stage: str | None = None) -> set[str]:
        return {e["key"] for e in self.entries() if stage is None or e["trial"].get("stage", "grid") == stage}

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0
