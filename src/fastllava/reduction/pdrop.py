"""`pdrop`: PyramidDrop, visual tokens dropped stage by stage with a ratio."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import UserError
from .base import LayerContext, Method, Selection, top_mask
from .merging import MERGE_MODES, merge_dropped
from .registry import register


@register
@dataclass
class PDrop(Method):
    """Split the decoder into stages at `layers` (default: 1/4, 1/2 and 3/4 of the depth, i.e.
    8-16-24 on a 32-layer LLaVA-7B); at the end of each stage rank the remaining visual tokens by
    the attention that the last instruction token (the prompt's last token) pays them in that
    layer, averaged over heads, and keep the top ones: `keep` after the first cut, then `ratio`
    times as many after each further cut (the pyramid). Dropped tokens are gone (`merge=none`, the
    paper's method) or merged into the kept ones at each cut (`merge=mean|prop`, see
    reduction.merging).

    Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", arXiv:2410.17247, 2024 (CVPR 2025).
    """

    name = "pdrop"
    paper = "Xing et al. 2024, PyramidDrop: Pyramid Visual Redundancy Reduction (arXiv:2410.17247)"
    where = "llm"
    needs_attention = True
    merge_modes = MERGE_MODES

    keep: int = 64
    ratio: float = 0.5
    layers: list[int] = field(default_factory=list)
    merge: str = "none"

    def bind(self, num_layers: int) -> "PDrop":
        if self.layers:
            return self
        return replace(self, layers=sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))

    def budgets(self) -> list[int]:
        return [max(1, round(self.keep * self.ratio ** i)) for i in range(len(self.layers))]

    def cuts(self) -> list[int]:
        return [k - 1 for k in self.layers]

    def attention_queries(self) -> str:
        return "last"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if not 0 < self.ratio <= 1:
            raise UserError(f"{self.spec()}: ratio must be in (0, 1]")
        if sorted(set(self.layers)) != list(self.layers):
            raise UserError(f"{self.spec()}: layers must be increasing, e.g. layers=8-16-24")
        super().check(tokens, num_layers, grid)

    def select(self, ctx: LayerContext) -> Selection:
        last = ctx.last_attention()  # [B, T]
        return merge_dropped(ctx, top_mask(last.gather(1, ctx.cand), ctx.cand_valid, ctx.budget), self.merge)
