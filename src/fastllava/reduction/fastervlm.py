"""`fastervlm`: keep the visual tokens the class token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, Selection, VisionContext, top_mask
from .registry import register


@register
@dataclass
class FasterVLM(Method):
    """Keep the `keep` patches with the highest [CLS] attention (averaged over heads) in the
    vision tower's selected layer, before the projector; the rest are dropped.

    Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make
    VLM Inference Faster" (FasterVLM), arXiv:2412.01818, 2024.
    """

    name = "fastervlm"
    paper = "Zhang et al. 2024, [CLS] Attention is All You Need for Training-Free Visual Token Pruning (arXiv:2412.01818)"
    needs_cls = True

    keep: int = 64

    def select(self, ctx: VisionContext) -> Selection:
        scores = ctx.cls_attention  # [N, P]
        return Selection(top_mask(scores, scores.new_ones(scores.shape, dtype=bool), ctx.budget))
