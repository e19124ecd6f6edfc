"""LLaVA-OneVision: a SigLIP tower, a Qwen2 decoder and LLaVA-NeXT's AnyRes with larger tile
grids. Each image arrives as a base thumbnail plus tiles (see fastllava.anyres); every piece is
encoded and projected on its own (all of SigLIP's patches, no class token), the tiles' feature
grids are joined, cropped to the image's aspect ratio, scaled down bilinearly when they exceed
`max_tiles` tiles' worth (anyres_max_N), and a learned `image_newline` ends each row; the base
thumbnail's features come first. A video's frames go through the tower as thumbnails, each
frame's feature grid is pooled 2 x 2 (bilinear), and one `image_newline` follows the last frame.
The arithmetic follows transformers' LlavaOnevisionModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .. import anyres
from ..errors import UserError
from .frames import frame_rows, frames_per_video
from .llava import LlavaModel
from .llava_next import LlavaNextModel, _centres


class OnevisionModel(LlavaNextModel):
    kind = "LLaVA-OneVision"
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      blocks: tuple[int, ...] = (), tower=None, batch_num_images: list[int] | None = None) -> dict:
        """As LlavaNextModel.encode_images: one row per image in the language model's order (base
        features, then the unpadded and possibly scaled-down tile grid row by row, each row ended
        by image_newline), rows padded to the longest image, with `valid`, `part` (0 the base
        thumbnail, 1 + the index of the tile a grid token's centre falls in, -1 a newline) and
        `where` [N, F]. A scaled-down grid's `vision` is scaled the same way. `batch_num_images`:
        images per prompt, in order (None: one each); the images of a prompt with several come as
        one piece each (see images.OnevisionProcessor) and give their thumbnail's features and one
        newline. No class token, so no class-token attention (`blocks` must be empty)."""
        if blocks:
            raise UserError("LLaVA-OneVision's SigLIP tower has no class token: methods that read its attention "
                            "do not apply")
        tiles, sizes, grids = self._pieces(pixel_values, image_sizes, batch_num_images)
        per_tile = LlavaModel.encode_images(self, tiles, None, (), tower)  # [sum of tiles, g*g, ...]
        counts = [rows * cols + 1 for rows, cols in grids]
        out = {}
        for key in ("vision", "features"):
            x = per_tile[key]
            fill = self.image_newline.to(x.dtype) if key == "features" else x.new_zeros(x.shape[-1])
            out[key] = pad_sequence([self._pack(t, s, grid, fill) for t, s, grid in zip(x.split(counts), sizes, grids)],
                                    batch_first=True)
        out.update(cls_attention=None, keys=None, early_attention=None)
        layouts = [self._layout(s, grid) for s, grid in zip(sizes, grids)]
        device = tiles.device
        out["valid"] = pad_sequence([torch.ones(len(p), dtype=torch.bool) for p, _ in layouts],
                                    batch_first=True).to(device)
        out["part"] = pad_sequence([p for p, _ in layouts], batch_first=True, padding_value=-1).to(device)
        out["where"] = pad_sequence([w for _, w in layouts], batch_first=True).to(device)
        return out

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                       batch_num_images: list[int] | None = None) -> torch.Tensor:
        """pixel_values [N, P, C, H, W] (pieces per image, zero-padded) or [sum of pieces, C, H, W],
        image_sizes [N, 2], batch_num_images (see encode_images) -> the images' features one after
        another [F, D]."""
        images = self.encode_images(pixel_values, image_sizes, batch_num_images=batch_num_images)
        return images["features"][images["valid"]]

    def _pieces(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                batch_num_images: list[int] | None):
        """-> (every piece of every image [sum of pieces, C, H, W], the image sizes, their tile
        grids: (0, 0) for an untiled image)."""
        n = 0 if image_sizes is None else image_sizes.shape[0]
        return self._tiles(pixel_values, image_sizes, anyres.image_tiling(n, batch_num_images))

    def _grid_box(self, size: tuple[int, int], grid: tuple[int, int]):
        """-> (rows, cols of the unpadded part of the tiles' feature grid, its scaled (height, width))."""
        g = self.cfg.vision.grid
        ys, xs = anyres.unpadded_box(size, (grid[0] * g, grid[1] * g))
        h, w = ys.stop - ys.start, xs.stop - xs.start
        return ys, xs, anyres.scaled_grid((h, w), g, self.cfg.max_tiles)

    def _pack(self, x: torch.Tensor, size: tuple[int, int], grid: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
        """One image's pieces' features [1 + rows*cols, g*g, D] -> its tokens [F, D]."""
        g, (rows, cols) = self.cfg.vision.grid, grid
        if rows == 0:  # untiled: the thumbnail, then one newline
            return torch.cat([x[0], fill[None]])
        ys, xs, (h, w) = self._grid_box(size, grid)
        joined = x[1:].view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)  # [D, Y, X]
        joined = joined[:, ys, xs]
        if (h, w) != tuple(joined.shape[1:]):
            joined = F.interpolate(joined[None], [h, w], mode="bilinear")[0]
        joined = torch.cat([joined, fill[:, None, None].expand(-1, h, 1)], dim=2)  # a newline ends each row
        return torch.cat([x[0], joined.flatten(1).T])

    def _layout(self, size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's tokens -> (part [F], where [F, 2]): see encode_images; where is the (y, x)
        centre of a token's cell in the image, in [0, 1], 0 for a newline."""
        g, (rows, cols) = self.cfg.vision.grid, grid
        if rows == 0:  # untiled
            return torch.cat([torch.zeros(g * g, dtype=torch.long), torch.tensor([-1])]), torch.cat(
                [_centres(g, g, g), torch.zeros(1, 2)])
        ys, xs, (h, w) = self._grid_box(size, grid)
        cells = _centres(h, w, w + 1)  # [h * (w + 1), 2] over the unpadded grid
        newline = (torch.arange(h * (w + 1)) % (w + 1)) == w
        y = (ys.start + cells[:, 0] * (ys.stop - ys.start)).floor().long().clamp(max=rows * g - 1) // g
        x = (xs.start + cells[:, 1] * (xs.stop - xs.start)).floor().long().clamp(max=cols * g - 1) // g
        part = torch.cat([torch.zeros(g * g, dtype=torch.long), torch.where(newline, -1, 1 + y * cols + x)])
        where = torch.cat([_centres(g, g, g), cells.masked_fill(newline[:, None], 0)])
        return part, where

    def encode_videos(self, pixel_values_videos: torch.Tensor, tower=None) -> torch.Tensor:
        """pixel_values_videos [B, T, C, H, W] (T frames per video, each a thumbnail) -> the videos'
        features [B, T * s * s + 1, D]: each frame's g x g grid pooled bilinearly to s x s
        (s = ceil(g / 2)), frames one after another, then one image_newline."""
        frames = self.encode_frames(pixel_values_videos, tower)
        return frames["features"][frames["valid"]].view(pixel_values_videos.shape[0], -1, self.cfg.text.hidden_size)

    def encode_frames(self, pixel_values_videos: torch.Tensor, tower=None) -> dict:
        """The videos' frames as VisionContext rows (see models.frames.frame_rows): each frame's
        projected g x g grid pooled bilinearly to s x s, and its vision features pooled the same way;
        the video's image_newline on its last frame's row."""
        t = frames_per_video(pixel_values_videos)
        enc = LlavaModel.encode_images(self, pixel_values_videos.flatten(0, 1), None, (), tower)
        g = self.cfg.vision.grid
        s = -(-g // 2)

        def pool(x: torch.Tensor) -> torch.Tensor:  # [B*T, g*g, C] -> [B*T, s*s, C]
            grid = x.view(x.shape[0], g, g, -1).permute(0, 3, 1, 2)  # [B*T, C, g, g]
            return F.interpolate(grid, size=[s, s], mode="bilinear").permute(0, 2, 3, 1).reshape(x.shape[0], s * s, -1)

        return frame_rows(pool(enc["vision"]), pool(enc["features"]), s, t, self.image_newline)

    def embed_videos(self, x: torch.Tensor, input_ids: torch.Tensor, video_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings x [B, T, D] with video features ([V, F, D], or [sum F, D]) written at
        the video-token positions of input_ids [B, T], videos in order of appearance."""
        is_video = input_ids == self.cfg.video_token_index
        n_slots, n_feats = int(is_video.sum()), video_features.numel() // video_features.shape[-1]
        if n_slots != n_feats:
            raise UserError(f"the prompt holds {n_slots} video tokens but the videos give {n_feats} features")
        return x.masked_scatter(is_video[..., None], video_features.reshape(-1, x.shape[-1]).to(x.dtype))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None,
              video_features: torch.Tensor | None = None) -> torch.Tensor:
        """As LlavaModel.embed, video tokens taking `video_features` (see embed_videos); without
        them, the video token is embedded like any other token (it must then not be in the prompt)."""
        if video_features is None:
            return super().embed(input_ids, image_features)
        is_video = input_ids == self.cfg.video_token_index
        x = super().embed(input_ids.masked_fill(is_video, 0), image_features)
        return self.embed_videos(x, input_ids, video_features)
