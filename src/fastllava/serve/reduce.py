"""Per-request token reduction: `"reduce": "SPEC"` in the body, else the server's --reduce."""

from __future__ import annotations

from ..config import LlavaConfig
from ..errors import UserError
from ..reduction.runtime import check_fits, check_videos, make_reduction
from .errors import invalid


def check_reduce(spec: str | None, cfg: LlavaConfig, image_tokens: list[int] = (), videos: int = 0,
                 server_default: bool = False) -> None:
    """Refuse (400) a spec that names no method, has bad parameters or does not fit the model, or
    whose budget is more than the visual tokens of one of the request's images (`image_tokens`,
    one count per image: they differ by image size on LLaVA-NeXT) or of a video frame (with
    `videos` videos; a method that cannot reduce videos is refused too). `server_default`: the
    spec is the server's --reduce, not the request's (the message says so)."""
    try:
        reduction = make_reduction(spec, cfg)
        for i, n in enumerate(image_tokens if reduction is not None else []):
            check_fits(reduction.method, n, f"image {i + 1} of the request")
        if reduction is not None and videos:
            check_videos(reduction.method)
            check_fits(reduction.method, cfg.frame_tokens, "a video frame")
    except UserError as e:
        whose = f" (this server's --reduce {spec})" if server_default else ""
        raise invalid(f"reduce: {e}{whose}", "reduce", "invalid_reduction") from None
