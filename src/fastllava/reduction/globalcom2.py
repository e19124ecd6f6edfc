"""`globalcom2`: the LLaVA-NeXT thumbnail commands the compression of the tiles: its attention
sets each tile's retention ratio and guides which of the tile's tokens survive."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Selection, VisionContext, VisionMethod
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


@register
@dataclass
class GlobalCom2(VisionMethod):
    """Before the projector, for each LLaVA-NeXT image, with R = keep / (the image's tokens):

    1. Thumbnail: the base image keeps R of its tokens, those its [CLS] attends to most (selected
       layer, heads averaged): its own importance.
    2. Tile ratios: the thumbnail's attention map is sampled (bilinearly) at the centre of every
       tile patch, which the thumbnail shows at the same place in the image; tile j's global
       importance s_j is the thumbnail attention over its region, sigma = softmax((s - max s) / tau)
       over the image's n tiles, and tile j keeps the ratio R (1 + sigma_j - 1/n), so that the
       ratios average R. In tokens: `keep` is shared among the thumbnail (weight: its tokens) and
       the tiles (weight: tokens_j (1 + sigma_j - 1/n)) by Sainte-Lague apportionment, capped at a
       partition's tokens (reduction.base.share), so the budget holds exactly.
    3. Tile tokens: ranked by alpha * (the sampled thumbnail attention, global) + (1 - alpha) *
       (the tile's own [CLS] attention, local); each tile keeps its best up to its share.

    image_newline tokens are kept only when `keep` exceeds the image's patches. LLaVA-NeXT only
    (LLaVA-1.5 has no tiles; its thumbnail alone is fastervlm). alpha = 0.5 is the paper's; tau
    and the default budget (320 of LLaVA-NeXT-7B's up to 2880 tokens) are ours.
    The dropped patches are gone (`merge=none`, the paper's method) or merged into the most
    similar kept patch of their image (`merge=mean|prop`, see reduction.merging).

    Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs
    Acceleration" (GlobalCom²), arXiv:2501.05179, 2025.
    """

    name = "globalcom2"
    paper = "Liu et al. 2025, Compression with Global Guidance: Training-free High-Resolution MLLMs Acceleration (GlobalCom², arXiv:2501.05179)"
    needs_cls = True
    images = "tiled"
    merge_modes = MERGE_MODES

    keep: int = 320
    alpha: float = 0.5
    tau: float = 0.1
    merge: str = "none"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if not 0 <= self.alpha <= 1 or self.tau <= 0:
            raise UserError(f"{self.spec()}: needs 0 <= alpha <= 1 and tau > 0")
        super().check(tokens, num_layers, grid)

    def select(self, ctx: VisionContext) -> Selection:
        n, p = ctx.cls_attention.shape
        g = ctx.grid
        thumb = ctx.cls_attention[:, :g * g].float().reshape(n, 1, g, g)  # the base image's attention map
        at = ctx.where.flip(-1).float() * 2 - 1  # [N, P, 2] (x, y) in [-1, 1]
        guide = F.grid_sample(thumb, at[:, :, None], align_corners=False, padding_mode="border").view(n, p)
        tile = ctx.part > 0  # [N, P]
        sizes = ctx.per_part(torch.ones_like(guide))  # [N, S] tokens per partition
        mass = ctx.per_part(guide * tile) * (g * g) / (sizes[:, 1:].sum(1, keepdim=True))  # [N, S] s_j
        tiles = sizes > 0
        tiles[:, 0] = False
        sigma = ((mass - mass.masked_fill(~tiles, float("-inf")).amax(1, keepdim=True)) / self.tau)
        sigma = sigma.masked_fill(~tiles, float("-inf")).softmax(1)  # [N, S], 0 off the tiles
        weights = torch.where(tiles, sizes * (1 + sigma - 1 / tiles.sum(1, keepdim=True)), sizes)
        scores = torch.where(tile, self.alpha * guide + (1 - self.alpha) * ctx.cls_attention.float(),
                             ctx.cls_attention.float())
        return merge_dropped_vision(ctx, ctx.top(scores, ctx.budget, weights), self.merge)
