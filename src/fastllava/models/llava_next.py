"""LLaVA-NeXT: LLaVA with AnyRes images. Each image arrives as a base thumbnail plus a grid of
tiles (see fastllava.anyres); every tile is encoded and projected on its own, the tiles'
feature grids are joined into one, cropped to the image's aspect ratio, and a learned
`image_newline` ends each of its rows. The base thumbnail's features come first. For token
reduction, `encode_images` also says which partition (base image or tile) each token comes from
and where in the image it lies, so that methods can select per tile (see reduction.base)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .. import anyres
from ..config import LlavaConfig
from ..errors import UserError
from .llava import LlavaModel


class LlavaNextModel(LlavaModel):
    kind = "LLaVA-NeXT"  # the family's name in messages
    def __init__(self, cfg: LlavaConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [N, P, C, H, W] (tiles per image, zero-padded to the most tiles, as
        LlavaNextImageProcessor makes them) or [sum of tiles, C, H, W], image_sizes [N, 2]
        (height, width before preprocessing) -> the images' features one after another [F, D]."""
        images = self.encode_images(pixel_values, image_sizes)
        return images["features"][images["valid"]]

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      blocks: tuple[int, ...] = (), tower=None) -> dict:
        """As LlavaModel.encode_images, one row per image in the order the language model receives its
        tokens (base features, then the unpadded tile grid row by row, each row ended by
        image_newline), rows padded to the longest image; adds `valid`, `part` and `where` [N, F]."""
        tiles, sizes, grids = self._tiles(pixel_values, image_sizes)
        per_tile = super().encode_images(tiles, None, blocks, tower)  # [sum of tiles, g*g, ...] each
        layouts = [self.token_layout(s, grid) for s, grid in zip(sizes, grids)]  # (src [F], where [F, 2]) per image
        counts = [rows * cols + 1 for rows, cols in grids]
        out = {}
        for key, x in per_tile.items():
            if x is None:
                out[key] = None
                continue
            fill = self.image_newline.to(x.dtype) if key == "features" else x.new_zeros(x.shape[2:])
            flat = [torch.cat([t.flatten(0, 1), fill[None]]) for t in x.split(counts)]  # src -1 reads `fill`
            out[key] = pad_sequence([f[src.to(f.device)] for f, (src, _) in zip(flat, layouts)], batch_first=True)
        g2, device = self.cfg.vision.grid ** 2, tiles.device
        out["valid"] = pad_sequence([torch.ones(len(src), dtype=torch.bool) for src, _ in layouts], batch_first=True).to(device)
        out["part"] = pad_sequence([torch.where(src >= 0, src // g2, -1) for src, _ in layouts], batch_first=True,
                                   padding_value=-1).to(device)
        out["where"] = pad_sequence([w for _, w in layouts], batch_first=True).to(device)
        return out

    def _tiles(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, tiled: list[bool] | None = None):
        """-> (every tile of every image [sum of tiles, C, H, W], the image sizes, their tile grids);
        `tiled` [N] False for an image that is one piece, not tiled (grid (0, 0); OneVision)."""
        if image_sizes is None:
            raise UserError(f"{self.kind} pixel_values need the image_sizes (height, width) of their images")
        cfg = self.cfg
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        tiled = tiled or [True] * len(sizes)
        grids = [anyres.tile_grid(s, cfg.image_grid_pinpoints, cfg.vision.image_size) if t else (0, 0)
                 for s, t in zip(sizes, tiled)]
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
        return pixel_values, sizes, grids

    def token_layout(self, size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's visual tokens in the language model's order -> (src [F]: the index of each
        among the image's tile patches [(1 + rows*cols) * g*g], -1 for an image_newline; where
        [F, 2]: (y, x) in [0, 1], the centre of its patch in the image, 0 for a newline)."""
        g = self.cfg.vision.grid
        src, (h, w) = anyres.token_sources(size, grid, g)
        src = torch.tensor(src)
        where = torch.cat([_centres(g, g, g), _centres(h, w, w + 1)]).masked_fill((src < 0)[:, None], 0)
        return src, where


def _centres(rows: int, cols: int, width: int) -> torch.Tensor:
    """[rows * width, 2]: (y, x) centres of the cells of a rows x cols grid over [0, 1]², row by row,
    each row `width` long (cells past `cols` lie outside)."""
    y = (torch.arange(rows) + 0.5) / rows
    x = (torch.arange(width) + 0.5) / cols
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)


def build_model(cfg: LlavaConfig) -> LlavaModel:
    """The model class a config asks for: LLaVA-OneVision, LLaVA-NeXT or LLaVA-1.5."""
    if cfg.is_onevision:
        from .onevision import OnevisionModel  # it builds on LlavaNextModel

        return OnevisionModel(cfg)
    return LlavaNextModel(cfg) if cfg.is_next else LlavaModel(cfg)
