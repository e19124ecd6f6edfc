"""LLaVA-NeXT: LLaVA with AnyRes images. Each image arrives as a base thumbnail plus a grid of
tiles (see fastllava.anyres); every tile is encoded and projected on its own, the tiles'
feature grids are joined into one, cropped to the image's aspect ratio, and a learned
`image_newline` ends each of its rows. The base thumbnail's features come first."""

from __future__ import annotations

import torch
from torch import nn

from .. import anyres
from ..config import LlavaConfig
from ..errors import UserError
from .llava import LlavaModel


class LlavaNextModel(LlavaModel):
    def __init__(self, cfg: LlavaConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, P, C, H, W] (tiles per image, zero-padded to the most tiles, as
        LlavaNextImageProcessor makes them) or [sum of tiles, C, H, W], image_sizes [N, 2]
        (height, width before preprocessing) -> the images' features one after another [F, D]."""
        if image_sizes is None:
            raise UserError("LLaVA-NeXT pixel_values need the image_sizes (height, width) of their images")
        cfg = self.cfg
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        grids = [anyres.tile_grid(s, cfg.image_grid_pinpoints, cfg.vision.image_size) for s in sizes]
        counts = [rows * cols + 1 for rows, cols in grids]  # tiles + the base image
        if pixel_values.dim() == 5:
            if len(sizes) != pixel_values.shape[0]:
                raise UserError(f"{pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes")
            if max(counts) > pixel_values.shape[1]:
                raise UserError(f"an image of these image_sizes needs {max(counts)} tiles, pixel_values hold "
                                f"{pixel_values.shape[1]}")
            pixel_values = torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)])
        elif pixel_values.shape[0] != sum(counts):
            raise UserError(f"pixel_values hold {pixel_values.shape[0]} tiles, image_sizes need {sum(counts)}")
        feats = self.multi_modal_projector(self.vision_features(pixel_values))  # [sum P, g*g, D]
        out = [self._pack(f, s, grid) for f, s, grid in zip(feats.split(counts), sizes, grids)]
        return torch.cat(out)

    def _pack(self, feats: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """One image's tile features feats [1 + rows*cols, g*g, D] -> [F, D]: the base features,
        then the unpadded tile grid row by row, each row ended by image_newline."""
        (rows, cols), g, d = grid, self.cfg.vision.grid, feats.shape[-1]
        tiles = feats[1:].view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
        ys, xs = anyres.unpadded_box(size, (rows * g, cols * g))
        tiles = tiles[ys, xs]  # [h, w, D]
        newline = self.image_newline.to(tiles.dtype).expand(tiles.shape[0], 1, d)  # [h, 1, D]
        return torch.cat([feats[0], torch.cat([tiles, newline], dim=1).reshape(-1, d)])

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, valid: torch.Tensor,
                positions: torch.Tensor, reduction=None, image_sizes: torch.Tensor | None = None):
        """As LlavaModel.prepare, for AnyRes images (no token reduction yet: make_reduction refuses)."""
        assert reduction is None, "token reduction does not support LLaVA-NeXT yet"
        feats = None if pixel_values is None else self.image_features(pixel_values, image_sizes)
        return self.embed(input_ids, feats), positions, valid


def build_model(cfg: LlavaConfig) -> LlavaModel:
    """The model class a config asks for: LLaVA-NeXT or LLaVA-1.5."""
    return LlavaNextModel(cfg) if cfg.is_next else LlavaModel(cfg)
