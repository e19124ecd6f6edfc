"""LLaVA-NeXT-Video: LLaVA-NeXT (CLIP tower, AnyRes images with image_newline) that also takes
videos. A video's frames go through the same tower one by one (each a single square piece, no
tiles); each frame's grid of selected features (class token dropped) is pooled spatially
(`spatial_pool_mode` average, max or a learned conv; window and stride `spatial_pool_stride`)
*before* the projector, the pooled grid is read row by row, the frames follow one another and no
newline is added. The features go where the video token stands. The arithmetic follows
transformers' LlavaNextVideoModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig
from ..errors import UserError
from .frames import frame_rows, frames_per_video
from .llava_next import LlavaNextModel


class SpatialPool(nn.Module):
    """Pools a frame's feature grid [N, D, g, g] -> [N, D, g // s, g // s] with window and stride s
    (floor: trailing rows and columns that do not fill a window are dropped, as in torch's pools)."""

    def __init__(self, mode: str, stride: int, channels: int):
        super().__init__()
        self.mode, self.stride = mode, stride
        if mode == "conv":  # checkpoint keys vision_resampler.pool.{weight,bias}
            self.pool = nn.Conv2d(channels, channels, kernel_size=stride, stride=stride)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if self.mode == "average":
            return F.avg_pool2d(grid, self.stride, self.stride)
        if self.mode == "max":
            return F.max_pool2d(grid, self.stride, self.stride)
        return self.pool(grid.to(self.pool.weight.dtype))


class NextVideoModel(LlavaNextModel):
    kind = "LLaVA-NeXT-Video"

    def __init__(self, cfg: LlavaConfig):
        super().__init__(cfg)
        self.vision_resampler = SpatialPool(cfg.spatial_pool_mode, cfg.spatial_pool_stride,
                                            cfg.vision.hidden_size * len(cfg.vision_feature_layers))

    def encode_videos(self, pixel_values_videos: torch.Tensor, tower=None) -> torch.Tensor:
        """pixel_values_videos [B, T, C, H, W] (T frames per video) -> the videos' features
        [B, T * s * s, D], s = grid // spatial_pool_stride: each frame's selected vision features
        pooled on their g x g grid, projected, frames one after another."""
        frames = self.encode_frames(pixel_values_videos, tower)
        return frames["features"].reshape(pixel_values_videos.shape[0], -1, self.cfg.text.hidden_size)

    def encode_frames(self, pixel_values_videos: torch.Tensor, tower=None) -> dict:
        """The videos' frames as VisionContext rows (see models.frames.frame_rows): `vision` the
        pooled grid of selected features, `features` its projection. `tower` (encode_tower, or a
        compiled or cached version of it) gives the frames' vision features when given; the
        projection it also makes, of the unpooled features, is not used (videos pool first)."""
        t, g = frames_per_video(pixel_values_videos), self.cfg.vision.grid
        frames = pixel_values_videos.flatten(0, 1)  # [B*T, C, H, W]
        vision = tower(frames, ())[0] if tower is not None else self.vision_features(frames)  # [B*T, g*g, Dv]
        grid = vision.transpose(1, 2).reshape(frames.shape[0], -1, g, g)  # [B*T, Dv, g, g]
        pooled = self.vision_resampler(grid).flatten(2).transpose(1, 2)  # [B*T, s*s, Dv], row by row
        side = g // self.cfg.spatial_pool_stride
        return frame_rows(pooled, self.multi_modal_projector(pooled), side, t, None)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None,
              video_features: torch.Tensor | None = None) -> torch.Tensor:
        """As LlavaModel.embed, the video tokens taking `video_features` ([V, F, D] or [sum F, D],
        videos in order of appearance); without them, the prompt must hold no video token."""
        if video_features is None:
            return super().embed(input_ids, image_features)
        is_video = input_ids == self.cfg.video_token_index  # [B, T]
        x = super().embed(input_ids.masked_fill(is_video, 0), image_features)
        n_slots, n_feats = int(is_video.sum()), video_features.numel() // video_features.shape[-1]
        if n_slots != n_feats:
            raise UserError(f"the prompt holds {n_slots} video tokens but the videos give {n_feats} features")
        return x.masked_scatter(is_video[..., None], video_features.reshape(-1, x.shape[-1]).to(x.dtype))
