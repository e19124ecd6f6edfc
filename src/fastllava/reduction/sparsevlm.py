"""`sparsevlm`: text raters score the visual tokens; pruned tokens are partly recycled."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import LayerContext, Method, Selection, mean_into, top_mask
from .registry import register


@register
@dataclass
class SparseVLM(Method):
    """After layer K (`layer`):

    1. Raters: each text token's relevance to the image is its softmax attention weight from the
       visual tokens (hidden states after layer K, scaled dot products over the row's text
       tokens), averaged over the visual tokens; text tokens at or above the row's mean relevance
       rate the visual tokens.
    2. Each visual token's score is the attention the raters pay it in layer K (mean over heads
       and raters); the top `keep - recycle` per image are kept.
    3. Recycling: of the pruned tokens, the `tau` fraction with the highest scores is clustered
       with density peaks (DPC-KNN) into `recycle` groups per image; each group is merged (mean
       hidden state) into one token that takes its centre's place.

    The paper's adaptive pruning count (from the rank of the attention matrix) is replaced by the
    fixed budget, so every image keeps exactly `keep` tokens. `recycle=-1` uses keep // 8.

    Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
    Inference", arXiv:2410.04417, 2024 (ICML 2025).
    """

    name = "sparsevlm"
    paper = "Zhang et al. 2024, SparseVLM: Visual Token Sparsification (arXiv:2410.04417)"
    where = "llm"
    needs_attention = True

    keep: int = 64
    layer: int = 2
    recycle: int = -1
    tau: float = 0.5
    knn: int = 5

    def recycled(self) -> int:
        return self.keep // 8 if self.recycle == -1 else self.recycle

    def cuts(self) -> list[int]:
        return [self.layer - 1]

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        super().check(tokens, num_layers, grid)
        if self.recycle < -1 or self.recycled() >= self.keep:
            raise UserError(f"{self.spec()}: recycle must be in 0..keep-1 ({self.keep - 1}), or -1 for keep // 8")
        if not 0 < self.tau <= 1 or self.knn < 1:
            raise UserError(f"{self.spec()}: needs 0 < tau <= 1 and knn >= 1")

    def select(self, ctx: LayerContext) -> Selection:
        h = ctx.hidden.float()  # [B, T, D]
        text = ctx.text  # [B, T]
        vis = ctx.gather(h)  # [B, N, D]
        rel = (vis @ h.transpose(1, 2)) / math.sqrt(h.shape[-1])  # [B, N, T]
        rel = rel.masked_fill(~text[:, None, :], float("-inf")).softmax(-1)
        rel = (rel * ctx.cand_valid[..., None]).sum(1) / ctx.cand_valid.sum(1, keepdim=True).clamp(min=1)  # [B, T]
        mean = (rel * text).sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp(min=1)
        raters = text & (rel >= mean)  # [B, T]
        att = (ctx.probs.mean(1) * raters[..., None]).sum(1) / raters.sum(1, keepdim=True).clamp(min=1)  # [B, S]
        scores = att.gather(1, ctx.cand)  # [B, N]
        images = ctx.budget // self.keep
        n_rec = images * self.recycled()  # [B]
        kept = top_mask(scores, ctx.cand_valid, ctx.budget - n_rec)
        pruned = ctx.cand_valid & ~kept
        pool = top_mask(scores, pruned, (pruned.sum(1) * self.tau).ceil().long().clamp(min=n_rec))  # [B, N]
        centres, assign = dpc_knn(vis, pool, n_rec, self.knn)  # [B, N] bool, [B, N] candidate index or -1
        keep = kept | centres
        values = vis.clone()
        merged = mean_into(vis, assign, vis.shape[1])  # [B, N, D]: group means, indexed by centre
        values[centres] = merged[centres]
        groups = torch.where(kept, torch.arange(vis.shape[1], device=vis.device)[None], assign)
        return Selection(keep, values.to(ctx.hidden.dtype), groups)


def dpc_knn(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, knn: int):
    """Density-peaks clustering with k-nearest-neighbour density (Du et al. 2016) of the valid
    points of x [B, N, D] into k [B] clusters per row.
    -> (centres [B, N] bool, assign [B, N]: the centre of each valid point, -1 elsewhere)."""
    dist = torch.cdist(x, x)  # [B, N, N]
    pair = valid[:, :, None] & valid[:, None, :]
    big = float(dist.max()) + 1.0
    dist = dist.masked_fill(~pair, big)
    near = dist.topk(min(knn + 1, dist.shape[-1]), dim=-1, largest=False).values[..., 1:]  # self excluded
    density = torch.exp(-(near ** 2).mean(-1))  # [B, N]
    density = density.masked_fill(~valid, -1.0)
    higher = density[:, None, :] > density[:, :, None]  # [B, i, j]: j is denser than i
    delta = dist.masked_fill(~higher, big).amin(-1)  # distance to the nearest denser point
    top = delta >= big  # the densest point of a row: its largest distance instead
    delta = torch.where(top, dist.masked_fill(~pair, 0).amax(-1), delta)
    centres = top_mask(density * delta, valid, k)
    to_centre = dist.masked_fill(~centres[:, None, :], float("inf"))  # [B, N, N]
    own = torch.arange(x.shape[1], device=x.device)[None].expand_as(centres)
    assign = torch.where(centres, own, to_centre.argmin(-1)).masked_fill(~valid | (k[:, None] == 0), -1)
    return centres, assign
