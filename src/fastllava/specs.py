"""The one parser of the `NAME[:key=value,...]` specs users type (`--reduce`, `--kv-cache`, `--weights`).
Each caller keeps its own wording: it passes a function that turns a problem into the message.
Also the value types such specs share: 64-bit integers (what torch takes) and finite numbers."""

from __future__ import annotations

import math
from typing import Callable

from .errors import UserError


def split_spec(spec: str) -> tuple[str, str]:
    """' visionzip:keep=64 ' -> ('visionzip', 'keep=64')."""
    name, _, rest = spec.strip().partition(":")
    return name.strip(), rest


def parse_options(text: str, types: dict[str, Callable[[str], object]],
                  message: Callable[[str, str, str, str | None], str]) -> dict:
    """'key=value,...' -> {key: types[key](value)}, blanks skipped and stripped. A bad item raises
    UserError(message(problem, item, key, value)); problem is 'unknown' (key not in types), 'missing'
    (value None: no '='; or '': nothing after it), 'duplicate' (the key came before) or 'invalid'
    (types[key] raised ValueError)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), (value.strip() if eq else None)
        if key not in types or not value or key in out:
            problem = "unknown" if key not in types else "missing" if not value else "duplicate"
            raise UserError(message(problem, item, key, value))
        try:
            out[key] = types[key](value)
        except ValueError:
            raise UserError(message("invalid", item, key, value)) from None
    return out


INT64 = 2**63  # a signed 64-bit integer is in [-INT64, INT64)


def int64(text: str) -> int:
    """int(text), refused (ValueError) outside the signed 64-bit range."""
    value = int(text)
    if not -INT64 <= value < INT64:
        raise ValueError(f"{value} does not fit in 64 bits")
    return value


def finite_float(text: str) -> float:
    """float(text), refused (ValueError) when NaN or infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{value} is not finite")
    return value
