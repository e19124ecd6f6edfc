"""`mmtok`: keep the visual tokens that best cover both the prompt's text tokens and the image's
own visual tokens (greedy maximum coverage, a submodular objective)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Selection, VisionContext, VisionMethod
from .divprune import Rows, argmax_free, column, cosine
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


def scaled(sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each target's similarities sim [R, A, M] to the valid [R, M] candidates min-max scaled to
    [0, 1] (its best candidate 1, its worst 0; 1 everywhere when all are alike)."""
    v = valid[:, None, :]
    lo = sim.masked_fill(~v, float("inf")).amin(-1, keepdim=True)
    hi = sim.masked_fill(~v, float("-inf")).amax(-1, keepdim=True)
    out = torch.where(hi - lo > 1e-6, (sim - lo) / (hi - lo).clamp(min=1e-6), torch.ones_like(sim))
    return out.masked_fill(~v, 0)


def max_coverage(sim: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy maximisation of the coverage f(S) = sum_a weight_a max_{i in S} sim[a, i] (sim
    [R, A, M] >= 0 of A targets to M candidates, weight [R, A]) with budget [R] picks over the
    valid [R, M] candidates: each step adds the candidate of largest marginal gain
    sum_a weight_a max(0, sim[a, i] - covered_a). -> chosen [R, M]."""
    r, a, m = sim.shape
    covered = sim.new_zeros(r, a)
    chosen = torch.zeros_like(valid)
    rows = torch.arange(r, device=sim.device)
    for step in range(int(budget.max()) if r else 0):
        active = step < budget
        gain = torch.bmm(weight[:, None, :], (sim - covered[..., None]).clamp_(min=0)).squeeze(1)  # [R, M]
        j = argmax_free(gain, valid & ~chosen)
        covered = torch.where(active[:, None], torch.maximum(covered, column(sim, j)), covered)
        chosen[rows[active], j[active]] = True
    return chosen


@register
@dataclass
class MMTok(VisionMethod):
    """Keep the `keep` visual tokens that maximise a multimodal coverage, before the language
    model:

        f(S) = 1/|T| sum_{t in T} max_{i in S} s_TV(t, i) + alpha/|V| sum_{j in V} max_{i in S} s_VV(j, i)

    - text-to-vision: T the prompt's text tokens as the language model's input embeddings, s_TV
      their cosine similarity to the projected visual features (the LLM's embedding space);
    - vision-to-vision: V every visual token of the image (its partition on LLaVA-NeXT), s_VV
      the cosine similarity of the vision tower's features (before the projector).

    f is monotone submodular; it is maximised greedily (the (1 - 1/e) guarantee), adding at each
    step the token with the largest gain. The two similarities live on different scales, so each
    target's similarities are min-max scaled to [0, 1] over the candidates before covering (ours);
    `alpha` weighs the image's coverage against the text's (alpha=1, equal weight, is ours).
    The prompt's text is all of it, chat template included (the engine does not separate the
    question); the paper's optional VLM agent that writes extra text is not implemented. On
    LLaVA-NeXT per partition: the budget is shared among the base image and the tiles in
    proportion to their tokens (see reduction.base) and each partition covers the text and its own
    tokens; image_newline tokens are kept only when `keep` exceeds the image's patches. The rest
    are dropped (`merge=none`, the paper's method) or merged into the most similar kept token of
    their image (`merge=mean|prop`, see reduction.merging).

    Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs", ICLR
    2026, arXiv:2508.18264.
    """

    name = "mmtok"
    paper = "Dong et al. 2025, MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (ICLR 2026, arXiv:2508.18264)"
    merge_modes = MERGE_MODES

    keep: int = 64
    alpha: float = 1.0
    merge: str = "none"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.alpha < 0:
            raise UserError(f"{self.spec()}: alpha (the weight of the image's coverage) must be at least 0")
        super().check(tokens, num_layers, grid)

    def select(self, ctx: VisionContext) -> Selection:
        rows = Rows.of(ctx, ctx.budget)
        valid = rows.valid
        feats, vision = rows.take(ctx.features), rows.take(ctx.vision)
        text, text_valid = ctx.text[rows.image], ctx.text_valid[rows.image]  # [R, T, D], [R, T]
        sim = torch.cat([scaled(cosine(text, feats), valid), scaled(cosine(vision, vision), valid)], 1)
        words = text_valid.sum(1, keepdim=True).clamp(min=1)
        w_text = text_valid / words
        w_image = valid * (self.alpha / valid.sum(1, keepdim=True).clamp(min=1))
        weight = torch.cat([w_text, w_image], 1).to(sim.dtype)  # [R, T + M]
        return merge_dropped_vision(ctx, rows.keep(max_coverage(sim, weight, valid, rows.budget)), self.merge)
