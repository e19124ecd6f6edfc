"""Per-request token reduction: `"reduce": "SPEC"` in the body, else the server's --reduce."""

from __future__ import annotations

from ..config import LlavaConfig
from ..errors import UserError
from ..reduction.runtime import make_reduction
from .errors import invalid


def check_reduce(spec: str | None, cfg: LlavaConfig) -> None:
    """Refuse a spec that names no method, has bad parameters or does not fit the model (400)."""
    try:
        make_reduction(spec, cfg)
    except UserError as e:
        raise invalid(f"reduce: {e}", "reduce", "invalid_reduction") from None
