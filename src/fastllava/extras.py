"""Optional dependencies (pyproject's extras): `serve` (fastapi, uvicorn) for `fastllava serve`,
`plots` (matplotlib) for the PNG plots of `fastllava bench` and of `fastllava eval` sweeps.

`import fastllava` needs none of them; a command that does calls `require` before its real work,
so a missing one is a one-line UserError naming the extra to install, not a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


def require(module: str, extra: str, what: str) -> ModuleType:
    """The imported `module`, or a UserError saying that `what` (e.g. "fastllava serve") needs it
    and which extra of fastllava brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module.split('.')[0]}, from the {extra} extra: "
                        f"pip install 'fastllava[{extra}]'") from None
