"""MLflow tracking, by what it does:

- ``uri``: where to track (URI resolution, fail-fast reachability, client and experiment look-ups);
- ``schema``: what a run records (tags, params, metrics) and how it reads back as table rows;
- ``writer``: the sweep's experiment and parent run, and the Ray Tune callback (the only writer);
- ``readers``: the runs table, finished keys, predictions, report attachments;
- ``journal``: results kept on the sweep's storage while the server is away, logged when it is back.

Importing this package imports neither Ray nor MLflow; only ``writer`` needs Ray.
"""
from __future__ import annotations

from typing import Any

from xfer.tracking.uri import (DEFAULT_TRACKING_URI, TrackingError, absolute_sqlite, check_reachable, is_outage,
                               redact_uri, resolve_tracking_uri)

_READERS = ("asha_stops", "finished_keys", "load_curves", "load_predictions", "load_runs", "log_report")
__all__ = ["DEFAULT_TRACKING_URI", "TrackingError", "absolute_sqlite", "check_reachable", "is_outage",
           "redact_uri", "resolve_tracking_uri", *_READERS]


def __getattr__(name: str) -> Any:
    """The readers load on first use: importing ``xfer.tracking.uri`` (every CLI error path) must not pay
    for numpy, pandas or the regime registry."""
    if name in _READERS:
        from xfer.tracking import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'xfer.tracking' has no attribute {name!r}")
