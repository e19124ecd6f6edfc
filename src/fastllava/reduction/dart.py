"""`dart`: keep pivot tokens and the tokens least duplicating them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import LayerContext, Method, Selection, top_mask
from .merging import MERGE_MODES, merge_dropped
from .registry import register


@register
@dataclass
class DART(Method):
    """After layer K (`layer`), pick `pivots` pivot tokens per image among the visual tokens: those
    with the largest key norm (K-norm) in layer K. Every other visual token is scored by its
    highest cosine similarity (hidden states after layer K) to any pivot; the pivots and the
    `keep - pivots` least duplicated tokens are kept, the duplicates dropped (`merge=none`, the
    paper's method) or merged into the kept ones (`merge=mean|prop`, see reduction.merging).
    `pivots=-1` uses keep / 2 (our choice with `merge=prop`, made on a validation set).

    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More" (DART), arXiv:2502.11494, 2025.
    """

    name = "dart"
    paper = "Wen et al. 2025, Stop Looking for Important Tokens: Duplication Matters More (DART, arXiv:2502.11494)"
    where = "llm"
    merge_modes = MERGE_MODES

    keep: int = 64
    layer: int = 2
    pivots: int = 8
    merge: str = "none"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.pivots < 1 and self.pivots != -1:
            raise UserError(f"{self.spec()}: pivots must be at least 1, or -1 for keep / 2")
        super().check(tokens, num_layers, grid)

    def pivot_count(self) -> int:
        """Pivots per image."""
        return max(1, self.keep // 2) if self.pivots == -1 else min(self.pivots, self.keep)  # more change nothing

    def cuts(self) -> list[int]:
        return [self.layer - 1]

    def select(self, ctx: LayerContext) -> Selection:
        b, hkv, t, dh = ctx.keys.shape
        knorm = ctx.keys.transpose(1, 2).reshape(b, t, hkv * dh).float().norm(dim=-1)  # [B, T]
        images = ctx.budget // self.keep  # [B]
        pivots = top_mask(knorm.gather(1, ctx.cand), ctx.cand_valid, torch.minimum(images * self.pivot_count(), ctx.budget))
        h = F.normalize(ctx.gather(ctx.hidden).float(), dim=-1)  # [B, N, D]
        sim = (h @ h.transpose(1, 2)).masked_fill(~pivots[:, None, :], float("-inf")).amax(-1)  # [B, N]
        scores = (-sim).masked_fill(pivots, float("inf"))  # pivots first, then the least duplicated
        return merge_dropped(ctx, top_mask(scores, ctx.cand_valid, ctx.budget), self.merge)
