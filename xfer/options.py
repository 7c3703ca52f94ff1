"""Checking option values against typed defaults: one rule for regime options, dataset options and
the ``xfer trial`` flags, so the same value is accepted or refused everywhere.

The rule: a value must have the default's kind. An int option takes an integral number (``3`` or
``3.0``, and YAML 1.1's ``1e4`` string) and stores an ``int``; a float option takes any finite number;
a bool only ``true``/``false``; anything else its default's type. ``None`` defaults accept anything.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Mapping


class OptionError(ValueError):
    """A bad option name or value; the message names the option path and what is valid."""


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def yaml_number(v: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-4`` and ``1.0e5`` as strings; accept such strings as numbers."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return f if math.isfinite(f) else v
    return v


def unknown_key_message(key: str, valid: Iterable[str], path: str) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}.{key}: unknown key{hint}; valid keys: {', '.join(valid) or '(none)'}"


def coerce(value: Any, default: Any, path: str) -> Any:
    """``value`` converted to the default's kind, or OptionError."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)):
        v = yaml_number(value)
        if is_number(v) and (isinstance(default, float) or float(v).is_integer()):
            return float(v) if isinstance(default, float) else int(v)
    elif isinstance(value, type(default)):
        return value
    kind = "integer" if isinstance(default, int) and not isinstance(default, bool) else type(default).__name__
    raise OptionError(f"{path}: expected {kind} (default {default!r}), got {value!r}")


def check_options(raw: Mapping[str, Any], defaults: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``defaults`` overlaid with ``raw``: unknown names and values of the wrong kind are errors."""
    out = dict(defaults)
    for k, v in raw.items():
        if k not in defaults:
            raise OptionError(unknown_key_message(k, defaults, path))
        out[k] = coerce(v, defaults[k], f"{path}.{k}")
    return out
