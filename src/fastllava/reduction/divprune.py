"""`divprune`: keep the visual tokens that solve a max-min diversity problem (greedy farthest-point
selection by cosine distance of the projected features).

Also the helpers the subset-selection methods before the LLM share (divprune, vispruner, cdpruner,
mmtok): `Rows` lays each image's partitions out as rows of candidates with an exact budget each, so
that a greedy selection runs batched over all images and partitions at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Selection, VisionContext, VisionMethod, candidates
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


@dataclass
class Rows:
    """The candidates of a VisionContext as R rows: on LLaVA-1.5 one row per image (all its P
    tokens, budget ctx.budget); on LLaVA-NeXT one row per (image, partition) holding that
    partition's patches, with the image's budget shared among its partitions by ctx.top (in
    proportion to their tokens), so each row keeps an exact count. `extra` [N, P] holds the
    image_newline tokens ctx.top keeps (only when the budget exceeds the image's patches)."""

    image: torch.Tensor  # [R] long: the image of each row
    index: torch.Tensor  # [R, M] long: each candidate's place among its image's P tokens (0 where padded)
    valid: torch.Tensor  # [R, M] bool
    budget: torch.Tensor  # [R] long: candidates to keep in each row (<= its valid count)
    extra: torch.Tensor  # [N, P] bool

    @classmethod
    def of(cls, ctx: VisionContext, budget: int) -> "Rows":
        n, p = ctx.features.shape[:2]
        dev = ctx.features.device
        if ctx.part is None:
            index = torch.arange(p, device=dev).expand(n, -1)
            return cls(torch.arange(n, device=dev), index, torch.ones(n, p, dtype=torch.bool, device=dev),
                       torch.full((n,), budget, dtype=torch.long, device=dev),
                       torch.zeros(n, p, dtype=torch.bool, device=dev))
        quota = ctx.top(torch.zeros(n, p, device=dev), budget)  # how many of each partition, by Sainte-Lague
        s = int(ctx.part.max()) + 1
        counts = ctx.per_part(quota.float()).round().long()  # [N, S]
        member = ctx.patches[:, None, :] & (ctx.part[:, None, :] == torch.arange(s, device=dev)[None, :, None])
        index, valid = candidates(member.flatten(0, 1))  # [N*S, M]
        return cls(torch.arange(n, device=dev).repeat_interleave(s), index, valid, counts.flatten(),
                   quota & ~ctx.patches)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P, ...] -> each row's candidates [R, M, ...]."""
        return x[self.image[:, None], self.index]

    def keep(self, chosen: torch.Tensor) -> torch.Tensor:
        """chosen [R, M] -> the keep mask [N, P] (with the kept newlines)."""
        keep = self.extra.clone()
        r, j = (chosen & self.valid).nonzero(as_tuple=True)
        keep[self.image[r], self.index[r, j]] = True
        return keep


def argmax_free(scores: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """The best free candidate of each row (ties: lower index first). scores, free [R, M] -> [R]."""
    return scores.masked_fill(~free, float("-inf")).argmax(-1)


def column(x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """x [R, A, M], j [R] -> x[r, :, j[r]] [R, A]."""
    return x.gather(2, j[:, None, None].expand(-1, x.shape[1], 1)).squeeze(2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [R, A, B] of a [R, A, D] and b [R, B, D] (in float32 or wider)."""
    a = F.normalize(a.to(torch.promote_types(a.dtype, torch.float32)), dim=-1)
    b = F.normalize(b.to(a.dtype), dim=-1)
    return a @ b.transpose(1, 2)


def max_min_diverse(dist: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity: dist [R, M, M] pairwise distances, valid [R, M], budget [R] ->
    chosen [R, M]. The first pick is the candidate farthest from its nearest neighbour, each next
    one the candidate whose distance to the chosen set (to its nearest chosen member) is largest."""
    r, m = valid.shape
    eye = torch.eye(m, dtype=torch.bool, device=dist.device)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye
    score = dist.masked_fill(~pair, float("inf")).amin(-1)  # [R, M] nearest-neighbour distance
    chosen = torch.zeros_like(valid)
    rows = torch.arange(r, device=dist.device)
    for step in range(int(budget.max()) if r else 0):
        active = step < budget  # [R]
        j = argmax_free(score, valid & ~chosen)
        chosen[rows[active], j[active]] = True
        to_j = column(dist, j)  # [R, M] distance of every candidate to the new pick
        score = to_j if step == 0 else torch.minimum(score, to_j)
    return chosen


@register
@dataclass
class DivPrune(VisionMethod):
    """Keep the `keep` visual tokens that approximately solve the Max-Min Diversity Problem over
    the projected visual features (what the language model receives, as the paper prunes them):
    with cosine distance d(i, j) = 1 - cos(x_i, x_j), greedily start from the token whose nearest
    neighbour is farthest, then repeatedly add the token whose minimum distance to the tokens kept
    so far is largest, until `keep` are chosen. Independent of the prompt and of any attention.
    On LLaVA-NeXT per partition: the budget is shared among the base image and the tiles in
    proportion to their tokens (see reduction.base) and each partition selects its own diverse
    set; image_newline tokens are kept only when `keep` exceeds the image's patches. The rest are
    dropped (`merge=none`, the paper's method) or merged into the most similar kept token of
    their image (`merge=mean|prop`, see reduction.merging).

    Alvar, Singh, Akbari and Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv:2503.02175.
    """

    name = "divprune"
    paper = "Alvar et al. 2025, DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025, arXiv:2503.02175)"
    merge_modes = MERGE_MODES

    keep: int = 64
    merge: str = "none"

    def select(self, ctx: VisionContext) -> Selection:
        rows = Rows.of(ctx, ctx.budget)
        x = rows.take(ctx.features)
        chosen = max_min_diverse(1 - cosine(x, x), rows.valid, rows.budget)
        return merge_dropped_vision(ctx, rows.keep(chosen), self.merge)
