"""`fastv`: after layer K, keep the visual tokens that receive the most attention."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .base import LayerContext, Method, Selection, top_mask
from .merging import MERGE_MODES, merge_dropped
from .registry import register


@register
@dataclass
class FastV(Method):
    """The first `layer` (K) decoder layers see every visual token; after layer K, keep the
    `keep` visual tokens with the highest attention received in layer K, averaged over heads
    and over all (real) query tokens, as the paper describes (`rater=all`); `rater=last` ranks
    by the last prompt token's attention instead, as the authors' released code does. The other
    visual tokens leave every later layer and its KV cache (`merge=none`, the paper's method) or
    are merged into the kept ones (`merge=mean|prop`, see reduction.merging).

    Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models" (FastV), ECCV 2024, arXiv:2403.06764.
    """

    name = "fastv"
    paper = "Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (FastV, arXiv:2403.06764)"
    where = "llm"
    needs_attention = True
    merge_modes = MERGE_MODES

    keep: int = 64
    layer: int = 2
    rater: str = "all"
    merge: str = "none"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.rater not in ("all", "last"):
            raise UserError(f"{self.spec()}: rater must be all or last")
        super().check(tokens, num_layers, grid)

    def cuts(self) -> list[int]:
        return [self.layer - 1]

    def attention_queries(self) -> str:
        return "last" if self.rater == "last" else "all"

    def select(self, ctx: LayerContext) -> Selection:
        if self.rater == "last":
            received = ctx.last_attention()  # [B, T]
        else:
            probs = ctx.probs.mean(1) * ctx.valid[:, :, None]  # [B, T, S], real queries only
            received = probs.sum(1) / ctx.valid.sum(1, keepdim=True)  # [B, S]
        scores = received.gather(1, ctx.cand)  # [B, N]
        return merge_dropped(ctx, top_mask(scores, ctx.cand_valid, ctx.budget), self.merge)
