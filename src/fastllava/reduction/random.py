"""`random`: keep a random subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, VisionContext, VisionMethod
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


@register
@dataclass
class Random(VisionMethod):
    """Keep `keep` visual tokens drawn uniformly at random, before the language model.

    The random-selection baseline of Wen et al., "Token Pruning in Multimodal Large Language
    Models: Are We Solving the Right Problem?" (arXiv:2502.11501, 2025). The draw depends only
    on `seed` and the image's token count, so every image keeps the same patch positions alone or
    in a batch. On LLaVA-NeXT per tile: the budget is shared among the base image and the tiles in
    proportion to their tokens (see reduction.base). The rest are dropped (`merge=none`) or merged
    into the most similar kept token of their image (`merge=mean|prop`, see reduction.merging).
    """

    name = "random"
    paper = "random baseline; Wen et al. 2025, Token Pruning in MLLMs: Are We Solving the Right Problem? (arXiv:2502.11501)"
    merge_modes = MERGE_MODES

    keep: int = 64
    seed: int = 0
    merge: str = "none"

    def select(self, ctx: VisionContext) -> Selection:
        scores = torch.zeros(ctx.features.shape[:2])  # [N, P]: minus each token's place in the draw
        for row, count in enumerate(ctx.counts.tolist()):
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
            scores[row, order] = -torch.arange(count, dtype=scores.dtype)
        return merge_dropped_vision(ctx, ctx.top(scores.to(ctx.features.device), ctx.budget), self.merge)
