"""Plugins: modules a user names (a sweep's ``plugins:``, ``xfer --plugin``) that register their own
regimes, datasets or metrics when imported — in the driver and in every trial process."""
from __future__ import annotations

import importlib
from typing import Iterable


class PluginError(ImportError):
    """A plugin module could not be imported; the message says which and why."""


def import_plugins(modules: Iterable[str], path: str = "plugins") -> None:
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to load a plugin is the user's to fix
            raise PluginError(f"{path}[{i}]: cannot import plugin module {name!r}: {type(e).__name__}: {e} "
                              "(it must be importable on PYTHONPATH, in the driver and in every Ray worker)") from None
