"""A video's frames as rows of a reduction's VisionContext: one row per frame (pooled feature
grid, read row by row), the frames of each video in order, a video's closing `image_newline`
(LLaVA-OneVision) as an extra slot on its last frame's row. Flattening the real slots of the rows
gives the features that stand at the video tokens, in order.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .llava_next import _centres


def frames_per_video(pixel_values_videos: torch.Tensor) -> int:
    """Frames per video of pixel_values_videos [V, F, C, H, W] (UserError for another shape)."""
    if pixel_values_videos.dim() != 5:
        raise UserError(f"pixel_values_videos must be [videos, frames, channels, height, width], got "
                        f"{list(pixel_values_videos.shape)}")
    return pixel_values_videos.shape[1]


def frame_rows(vision: torch.Tensor, features: torch.Tensor, side: int, frames: int,
               newline: torch.Tensor | None) -> dict:
    """vision [V*F, s*s, Dv] and features [V*F, s*s, D] of V videos of F frames each (s = side),
    `newline` [D] the features closing each video (None: nothing closes it) -> the VisionContext
    fields `vision`, `features`, `valid`, `part` (0 a frame's cell, -1 the newline or padding) and
    `where` ((y, x) cell centres in [0, 1], 0 for the newline), [V*F, P, ...] with P = s*s (+1 with
    a newline); no class-token attention."""
    n, p = features.shape[:2]
    dev = features.device
    valid = torch.ones(n, p, dtype=torch.bool, device=dev)
    part = torch.zeros(n, p, dtype=torch.long, device=dev)
    where = _centres(side, side, side).to(dev).expand(n, -1, -1)
    if newline is not None:
        last = (torch.arange(n, device=dev) % frames) == frames - 1  # [V*F] each video's last frame
        fill = torch.where(last[:, None], newline.to(features.dtype)[None], 0)  # [V*F, D]
        features = torch.cat([features, fill[:, None]], dim=1)
        vision = torch.cat([vision, vision.new_zeros(n, 1, vision.shape[-1])], dim=1)
        valid = torch.cat([valid, last[:, None]], dim=1)
        part = torch.cat([part, part.new_full((n, 1), -1)], dim=1)
        where = torch.cat([where, where.new_zeros(n, 1, 2)], dim=1)
    return dict(vision=vision, features=features, cls_attention=None, keys=None, early_attention=None,
                valid=valid, part=part, where=where)
