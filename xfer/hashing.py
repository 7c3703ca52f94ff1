"""Stable hashing of plain data: trial keys, feature keys and dataset fingerprints all use it, so the
same description always gives the same key on every machine and Python version."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no spaces; anything JSON cannot encode goes through ``str``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``canonical(obj)``."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]
