"""Per-request token reduction (`"reduce": "SPEC"` in the body, else the server's --reduce)."""

from __future__ import annotations

from .errors import invalid


def check_reduce(spec: str | None) -> None:
    """Token reduction is not wired into the server's batched prefill yet: any spec is refused."""
    if spec:
        raise invalid(f"token reduction ({spec!r}) is not available in this server yet", "reduce",
                      "reduction_unavailable")
