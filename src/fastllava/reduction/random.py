"""`random`: keep a random subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Selection, VisionContext
from .registry import register


@register
@dataclass
class Random(Method):
    """Keep `keep` visual tokens drawn uniformly at random, before the language model.

    The random-selection baseline of Wen et al., "Token Pruning in Multimodal Large Language
    Models: Are We Solving the Right Problem?" (arXiv:2502.11501, 2025). The draw depends only
    on `seed`, so every image (alone or in a batch) keeps the same patch positions.
    """

    name = "random"
    paper = "random baseline; Wen et al. 2025, Token Pruning in MLLMs: Are We Solving the Right Problem? (arXiv:2502.11501)"

    keep: int = 64
    seed: int = 0

    def select(self, ctx: VisionContext) -> Selection:
        n, p = ctx.features.shape[:2]
        order = torch.randperm(p, generator=torch.Generator().manual_seed(self.seed))[: ctx.budget]
        keep = torch.zeros(p, dtype=torch.bool)
        keep[order] = True
        return Selection(keep.to(ctx.features.device).expand(n, -1))
