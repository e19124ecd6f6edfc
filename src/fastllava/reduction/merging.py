"""Merging instead of dropping, for the methods that cut inside the language model (`merge=`).

A method chooses which visual tokens to keep; with `merge=mean` every token it would drop joins
the kept token of its prompt whose hidden state (after the cut layer) is most similar (cosine),
and each kept token carries on with the mean of its group's states, weighted by the tokens each
member already stands for. `merge=prop` also applies ToMe's proportional attention in every later
layer: log(group size) is added to the attention logits of a merged token's key, so that it draws
the attention its whole group would have drawn (exactly so when the group's keys and values are
equal). `merge=none` is the method as published: dropped tokens are gone.

Bolya et al., "Token Merging: Your ViT But Faster" (ToMe), ICLR 2023, arXiv:2210.09461 (size-
weighted merging and proportional attention); merging each pruned token into its most similar
kept token follows LLaVA-PruMerge (Shang et al. 2024, arXiv:2403.15388), here inside the language
model rather than before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import LayerContext, Method, Selection, candidates, mean_into, take

MERGE_MODES = ("none", "mean", "prop")


def check_merge(method: Method) -> None:
    """UserError when the method's `merge` is not one of MERGE_MODES."""
    if method.merge not in MERGE_MODES:
        raise UserError(f"{method.spec()}: merge must be one of {', '.join(MERGE_MODES)}")


def merge_dropped(ctx: LayerContext, keep: torch.Tensor, mode: str) -> Selection:
    """The Selection for keep [B, N] (over ctx's candidates) under merge `mode` (see the module)."""
    if mode == "none":
        return Selection(keep)
    h = ctx.gather(ctx.hidden).float()  # [B, N, D]
    unit = F.normalize(h, dim=-1)
    kept, kept_valid = candidates(keep)  # [B, K] each row's kept candidates
    sim = (unit @ take(unit, kept).transpose(1, 2)).masked_fill(~kept_valid[:, None, :], float("-inf"))  # [B, N, K]
    index = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    nearest = kept.gather(1, sim.argmax(-1))  # [B, N] the most similar kept candidate
    groups = torch.where(keep, index, nearest).masked_fill(~ctx.cand_valid | ~keep.any(1, keepdim=True), -1)
    weights = ctx.gather(ctx.sizes)  # [B, N] tokens each candidate already stands for
    values = mean_into(h, groups, keep.shape[1], weights)  # [B, N, D] each kept candidate's group mean
    sizes = weights.new_zeros(keep.shape).scatter_add_(1, groups.clamp(min=0), weights * (groups >= 0))
    return Selection(keep, values, groups, sizes if mode == "prop" else None)
