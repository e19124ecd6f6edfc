"""`fastervlm`: keep the visual tokens the class token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, VisionContext, VisionMethod
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


@register
@dataclass
class FasterVLM(VisionMethod):
    """Keep the `keep` patches with the highest [CLS] attention (averaged over heads) in the
    vision tower's selected layer, before the projector; the rest are dropped (`merge=none`) or
    merged into the most similar kept token of their image (`merge=mean|prop`, see
    reduction.merging; with `prop` this is close to LLaVA-PruMerge). On LLaVA-NeXT per
    tile: the budget is shared among the base image and the tiles in proportion to their tokens,
    each keeps the patches its own [CLS] attends to most (see reduction.base).

    Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make
    VLM Inference Faster" (FasterVLM), arXiv:2412.01818 v1, 2024 (its v2 is VisPruner).
    """

    name = "fastervlm"
    paper = "Zhang et al. 2024, [CLS] Attention is All You Need for Training-Free Visual Token Pruning (arXiv:2412.01818v1)"
    needs_cls = True
    merge_modes = MERGE_MODES

    keep: int = 64
    merge: str = "none"

    def select(self, ctx: VisionContext) -> Selection:
        return merge_dropped_vision(ctx, ctx.top(ctx.cls_attention, ctx.budget), self.merge)
