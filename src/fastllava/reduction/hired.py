"""`hired`: a LLaVA-NeXT token budget shared among the base image and the tiles by an early
layer's class-token attention, tokens chosen in each by the final layer's."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, VisionContext, VisionMethod
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


@register
@dataclass
class HiRED(VisionMethod):
    """Before the projector, for each LLaVA-NeXT image (a base thumbnail and its tiles, the
    *partitions*):

    1. Budget: each partition's visual content score is the [CLS] attention (heads averaged)
       that its own class token pays its patches in vision block `layer`, an early one, summed
       over the patches that reach the language model (a tile's padding is cut off before); the
       `keep` tokens are shared among the partitions in proportion to their scores (Sainte-Lague
       apportionment, capped at a partition's tokens; reduction.base.share).
    2. Dropping: each partition keeps the patches with the highest [CLS] attention in the
       selected feature layer (the final layer LLaVA reads), up to its share.

    image_newline tokens are kept only when `keep` exceeds the image's patches. LLaVA-NeXT only
    (LLaVA-1.5 has one partition, where this is fastervlm). The default budget, 320 of LLaVA-NeXT-
    7B's up to 2880 tokens per image, is ours.
    The dropped patches are gone (`merge=none`, the paper's method) or merged into the most
    similar kept patch of their image (`merge=mean|prop`, see reduction.merging).

    Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
    Vision-Language Models", AAAI 2025, arXiv:2408.10945.
    """

    name = "hired"
    paper = "Arif et al. 2024, HiRED: Attention-Guided Token Dropping for High-Resolution VLMs (arXiv:2408.10945)"
    needs_cls = True
    images = "tiled"
    merge_modes = MERGE_MODES

    keep: int = 320
    layer: int = 1
    merge: str = "none"

    def early_layer(self) -> int:
        return self.layer

    def select(self, ctx: VisionContext) -> Selection:
        content = ctx.per_part(ctx.early_attention)  # [N, S] visual content score of each partition
        return merge_dropped_vision(ctx, ctx.top(ctx.cls_attention, ctx.budget, content), self.merge)
