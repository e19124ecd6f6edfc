"""`pool`: average-pool the visual tokens to a smaller grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Selection, VisionContext, VisionMethod
from .registry import register


def pool_shape(keep: int) -> tuple[int, int]:
    """The most nearly square grid (rows, cols) with rows * cols == keep."""
    rows = max(d for d in range(1, int(keep ** 0.5) + 1) if keep % d == 0)
    return rows, keep // rows


@register
@dataclass
class Pool(VisionMethod):
    """Average-pool the patch grid (g x g) to rows x cols = `keep` cells (the most nearly square
    factorisation of keep), on the vision features before the projector; each pooled token takes
    the position of its cell's top-left patch. LLaVA-1.5 only: the tiles of a LLaVA-NeXT image,
    cropped to its aspect ratio, make no square grid (a one-line error there).

    The spatial-pooling baseline of Wen et al., "Token Pruning in Multimodal Large Language Models:
    Are We Solving the Right Problem?" (arXiv:2502.11501, 2025).
    """

    name = "pool"
    paper = "pooling baseline; Wen et al. 2025, Token Pruning in MLLMs: Are We Solving the Right Problem? (arXiv:2502.11501)"
    images = "single"  # LLaVA-NeXT's unpadded tiles are no square grid to pool

    keep: int = 64

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        super().check(tokens, num_layers, grid)
        rows, cols = pool_shape(self.keep)
        if cols > grid:
            raise UserError(f"{self.spec()}: {self.keep} tokens make a {rows}x{cols} grid, wider than the "
                            f"{grid}x{grid} patch grid; choose a budget whose most square factorisation fits")

    def select(self, ctx: VisionContext) -> Selection:
        n, p, dv = ctx.vision.shape
        g = ctx.grid
        first = p - g * g  # 1 with the "full" strategy's class token (not pooled, dropped), else 0
        rows, cols = pool_shape(ctx.budget)
        grid = ctx.vision[:, first:].transpose(1, 2).reshape(n, dv, g, g)
        pooled = F.adaptive_avg_pool2d(grid.float(), (rows, cols)).to(ctx.vision.dtype)  # [N, Dv, rows, cols]
        pooled = pooled.flatten(2).transpose(1, 2)  # [N, k, Dv]
        r0 = torch.arange(rows) * g // rows  # top-left patch of each cell (as adaptive pooling cuts)
        c0 = torch.arange(cols) * g // cols
        slots = (first + r0[:, None] * g + c0[None, :]).reshape(-1).to(ctx.vision.device)  # [k]
        keep = torch.zeros(n, p, dtype=torch.bool, device=ctx.vision.device)
        keep[:, slots] = True
        values = ctx.features.clone()
        values[:, slots] = ctx.project(pooled).to(values.dtype)
        r = torch.arange(g, device=slots.device) * rows // g  # cell of each patch row / column
        c = torch.arange(g, device=slots.device) * cols // g
        cell = (r[:, None] * cols + c[None, :]).reshape(-1)  # [g*g]
        groups = torch.full((n, p), -1, dtype=torch.long, device=slots.device)
        groups[:, first:] = slots[cell]
        return Selection(keep, values, groups)
