"""The one parser of the `NAME[:key=value,...]` specs users type (`--reduce`, `--kv-cache`, `--weights`).
Each caller keeps its own wording: it passes a function that turns a problem into the message."""

from __future__ import annotations

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
    (value None: no '='; or '': nothing after it) or 'invalid' (types[key] raised ValueError)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), (value.strip() if eq else None)
        if key not in types or not value:
            raise UserError(message("unknown" if key not in types else "missing", item, key, value))
        try:
            out[key] = types[key](value)
        except ValueError:
            raise UserError(message("invalid", item, key, value)) from None
    return out
