"""`vispruner`: important tokens by the class token's attention, then diverse tokens left after
removing near-duplicates among the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Selection, VisionContext, VisionMethod
from .divprune import Rows, cosine
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register

STEP = 8  # near-duplicates removed per round (per row), as the authors' code does


def remove_duplicates(sim: torch.Tensor, order: torch.Tensor, count: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Thin out each row's residual candidates order [R, W] (indices into sim's candidates, the
    first count [R] real) to target [R] of them: every round splits the current list alternately
    into A (even places) and B (odd places), scores each token of A by its highest similarity
    (sim [R, M, M]) to B, and removes the up to STEP highest-scoring ones; the list then becomes
    A's survivors (most similar first) followed by B. -> kept [R, M] bool."""
    r, w = order.shape
    m = sim.shape[-1]
    place = torch.arange(w, device=order.device)[None]
    flat = sim.reshape(r, m * m)
    count = torch.where(target > 0, count, 0)  # nothing diverse to keep: no rounds needed
    while True:
        cut = torch.minimum((count - target).clamp(max=STEP), (count + 1) // 2)  # [R], <= 0: row done
        if int(cut.max()) <= 0:
            break
        real = place < count[:, None]
        a, b = order[:, 0::2], order[:, 1::2]
        a_real, b_real = real[:, 0::2], real[:, 1::2]
        s = flat.gather(1, (a[:, :, None] * m + b[:, None, :]).flatten(1)).view(r, a.shape[1], b.shape[1])  # [R, A, B]
        off = torch.zeros(b.shape, dtype=s.dtype, device=s.device).masked_fill_(~b_real, float("-inf"))
        score = (s + off[:, None, :]).amax(-1).masked_fill(~a_real, float("-inf"))  # [R, A]
        by = score.argsort(dim=-1, descending=True, stable=True)  # [R, A]
        a_sorted, a_sorted_real = a.gather(1, by), a_real.gather(1, by)
        survive = a_sorted_real & (torch.arange(a.shape[1], device=order.device)[None] >= cut[:, None])
        joined, alive = torch.cat([a_sorted, b], 1), torch.cat([survive, b_real], 1)
        pack = (~alive).long().argsort(dim=-1, stable=True)  # survivors first, in order
        new = joined.gather(1, pack)[:, :w]
        done = cut <= 0
        order = torch.where(done[:, None], order, new)
        count = torch.where(done, count, count - cut.clamp(min=0))
    kept = torch.zeros(r, m, dtype=torch.bool, device=order.device)
    i, j = (place < count[:, None]).nonzero(as_tuple=True)
    kept[i, order[i, j]] = True
    return kept


@register
@dataclass
class VisPruner(VisionMethod):
    """Before the projector, in two parts:

    1. Important tokens: the floor(keep * ratio) patches with the highest [CLS] attention
       (heads averaged) in the vision tower's selected layer.
    2. Diverse tokens: the other patches, in order of that attention, are thinned out to the
       remaining keep - floor(keep * ratio) by removing near-duplicates: each round splits them
       alternately into two groups, scores each token of the first group by its highest cosine
       similarity (vision features) to the second, and drops the 8 highest-scoring ones, until
       the diverse budget is left.

    `ratio=0.5` (half important, half diverse) is the authors' default. On LLaVA-NeXT per
    partition: the budget is shared among the base image and the tiles in proportion to their
    tokens (see reduction.base) and each partition runs both parts on its own patches, as the
    authors' code does per tile; image_newline tokens are kept only when `keep` exceeds the
    image's patches. The rest are dropped (`merge=none`, the paper's method) or merged into the
    most similar kept token of their image (`merge=mean|prop`, see reduction.merging).

    Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
    Pruning in VLMs" (VisPruner), ICCV 2025, arXiv:2412.01818 (v2; v1 was FasterVLM).
    """

    name = "vispruner"
    paper = "Zhang et al. 2025, Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs (VisPruner, ICCV 2025, arXiv:2412.01818v2)"
    needs_cls = True
    merge_modes = MERGE_MODES

    keep: int = 64
    ratio: float = 0.5
    merge: str = "none"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if not 0 <= self.ratio <= 1:
            raise UserError(f"{self.spec()}: ratio (the important tokens' share of keep) must be in 0..1")
        super().check(tokens, num_layers, grid)

    def select(self, ctx: VisionContext) -> Selection:
        rows = Rows.of(ctx, ctx.budget)
        valid = rows.valid
        attention = rows.take(ctx.cls_attention).float().masked_fill(~valid, float("-inf"))  # [R, M]
        important = (rows.budget.double() * self.ratio).floor().long()  # [R]
        order = attention.argsort(dim=-1, descending=True, stable=True)  # [R, M] best first, padding last
        m = order.shape[1]
        place = torch.arange(m, device=order.device)[None]
        chosen = torch.zeros_like(valid)
        i, j = (place < important[:, None]).nonzero(as_tuple=True)
        chosen[i, order[i, j]] = True
        residual = order.gather(1, (place + important[:, None]).clamp(max=m - 1))  # [R, M] the rest, best first
        count = valid.sum(1) - important
        x = rows.take(ctx.vision)
        chosen |= remove_duplicates(cosine(x, x), residual, count, rows.budget - important)
        return merge_dropped_vision(ctx, rows.keep(chosen), self.merge)
