"""Per-request token reduction: `"reduce": "SPEC"` in the body, else the server's --reduce."""

from __future__ import annotations

from ..config import LlavaConfig
from ..errors import UserError
from ..reduction.runtime import check_fits, make_reduction
from .errors import invalid


def check_reduce(spec: str | None, cfg: LlavaConfig, image_tokens: list[int] = ()) -> None:
    """Refuse (400) a spec that names no method, has bad parameters or does not fit the model, or
    whose budget is more than the visual tokens of one of the request's images (`image_tokens`,
    one count per image: they differ by image size on LLaVA-NeXT)."""
    try:
        reduction = make_reduction(spec, cfg)
        for i, n in enumerate(image_tokens if reduction is not None else []):
            check_fits(reduction.method, n, f"image {i + 1} of the request")
    except UserError as e:
        raise invalid(f"reduce: {e}", "reduce", "invalid_reduction") from None
