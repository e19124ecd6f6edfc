"""`cdpruner`: keep the visual tokens of maximal conditional diversity: a determinantal point
process whose kernel is feature similarity weighted by relevance to the instruction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Selection, VisionContext, VisionMethod
from .divprune import Rows, argmax_free, column, cosine
from .merging import MERGE_MODES, merge_dropped_vision
from .registry import register


def relevance(ctx: VisionContext) -> torch.Tensor:
    """[N, P]: each visual token's mean cosine similarity to the prompt's text tokens, in the
    language model's input embedding space, min-max scaled to [0, 1] over the image's patches
    (1 everywhere for an image whose prompt has no text, or whose tokens are all alike)."""
    sim = cosine(ctx.features, ctx.text)  # [N, P, T]
    real = ctx.text_valid[:, None, :]
    words = ctx.text_valid.sum(1)  # [N]
    rel = torch.where(real, sim, 0).sum(-1) / words.clamp(min=1)[:, None]
    patches = ctx.patches
    lo = rel.masked_fill(~patches, float("inf")).amin(1, keepdim=True)
    hi = rel.masked_fill(~patches, float("-inf")).amax(1, keepdim=True)
    flat = (hi - lo <= 1e-6) | (words[:, None] == 0)
    return torch.where(flat, torch.ones_like(rel), (rel - lo) / (hi - lo).clamp(min=1e-6))


def greedy_map(kernel: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel [R, M, M] (positive semi-definite) over the valid
    [R, M] candidates, budget [R] picks per row, by the incremental Cholesky updates of Chen et al.
    (NeurIPS 2018): each step adds the candidate with the largest marginal gain in log det, d_i^2,
    and updates every d_i^2 with the new Cholesky row. -> chosen [R, M]."""
    r, m = valid.shape
    steps = int(budget.max()) if r else 0
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [R, M]
    rows_c = kernel.new_zeros(r, steps, m)  # the Cholesky rows found so far
    chosen = torch.zeros_like(valid)
    rows = torch.arange(r, device=kernel.device)
    for i in range(steps):
        active = i < budget
        j = argmax_free(d2, valid & ~chosen)
        dj = d2.gather(1, j[:, None]).squeeze(1)  # [R]
        kj = column(kernel, j)  # [R, M] (the kernel is symmetric)
        e = kj - (column(rows_c[:, :i], j)[..., None] * rows_c[:, :i]).sum(1)
        ok = active & (dj > 1e-10)  # a numerically dependent pick adds nothing to update
        e = torch.where(ok[:, None], e / dj.clamp(min=1e-10).sqrt()[:, None], torch.zeros_like(e))
        rows_c[:, i] = e
        d2 = d2 - e * e
        chosen[rows[active], j[active]] = True
    return chosen


@register
@dataclass
class CDPruner(VisionMethod):
    """Keep the `keep` visual tokens that maximise the conditional diversity of the kept set: a
    determinantal point process with kernel L_ij = q_i S_ij q_j, where S is the cosine similarity
    of the projected visual features and q_i each token's relevance to the instruction (its mean
    cosine similarity to the instruction's tokens, min-max scaled to [0, 1] over the image), solved
    by greedy MAP inference with incremental Cholesky updates (Chen et al. 2018).

    LLaVA checkpoints carry no CLIP text tower, which the paper uses to embed the instruction:
    here the instruction is the prompt's text tokens (chat template included) as the language
    model's input embeddings, compared with the projected visual features in that same space.
    The paper's relevance is the plain mean similarity, which we follow; the authors' LLaVA code
    negates it before scaling. On LLaVA-NeXT per partition: the budget is shared among the base
    image and the tiles in proportion to their tokens (see reduction.base), relevance is scaled over
    the whole image, and each partition runs its own DPP (as the authors' code does per tile);
    image_newline tokens are kept only when `keep` exceeds the image's patches. The rest are
    dropped (`merge=none`, the paper's method) or merged into the most similar kept token of their
    image (`merge=mean|prop`, see reduction.merging).

    Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs" (CDPruner), NeurIPS 2025, arXiv:2506.10967.
    """

    name = "cdpruner"
    paper = "Zhang et al. 2025, Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (CDPruner, NeurIPS 2025, arXiv:2506.10967)"
    merge_modes = MERGE_MODES

    keep: int = 64
    merge: str = "none"

    def select(self, ctx: VisionContext) -> Selection:
        rows = Rows.of(ctx, ctx.budget)
        x = rows.take(ctx.features)
        q = rows.take(relevance(ctx)).masked_fill(~rows.valid, 0)  # [R, M]
        kernel = q[:, :, None] * cosine(x, x) * q[:, None, :]
        return merge_dropped_vision(ctx, rows.keep(greedy_map(kernel, rows.valid, rows.budget)), self.merge)
