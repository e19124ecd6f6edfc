"""Merging instead of dropping (`merge=` on the methods that select tokens).

A method chooses which visual tokens to keep; with `merge=mean` every token it would drop joins
the most similar kept token (cosine) — inside the language model: of its prompt, by hidden state
after the cut layer; before it: of its image, by vision feature — and each kept token carries on
with the mean of its group's states, weighted by the tokens each member already stands for.
`merge=prop` also applies ToMe's proportional attention in every later layer of the language
model: log(group size) is added to the attention logits of a merged token's key, so that it draws
the attention its whole group would have drawn (exactly so when the group's keys and values are
equal). `merge=none` is the method as published: dropped tokens are gone.

Bolya et al., "Token Merging: Your ViT But Faster" (ToMe), ICLR 2023, arXiv:2210.09461 (size-
weighted merging and proportional attention); merging each pruned token into its most similar
kept token follows LLaVA-PruMerge (Shang et al. 2024, arXiv:2403.15388), which merges before the
language model by vision keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LayerContext, Selection, VisionContext, candidates, mean_into, take

MERGE_MODES = ("none", "mean", "prop")  # the merge_modes of the methods with a `merge=`


def merge_dropped(ctx: LayerContext, keep: torch.Tensor, mode: str) -> Selection:
    """The Selection for keep [B, N] over a LayerContext's candidates under merge `mode`: tokens
    are matched and averaged by their hidden states after the cut layer."""
    if mode == "none":
        return Selection(keep)
    h = ctx.gather(ctx.hidden).float()  # [B, N, D]
    return merge_into_kept(keep, h, h, ctx.cand_valid, ctx.gather(ctx.sizes), mode)


def merge_dropped_vision(ctx: VisionContext, keep: torch.Tensor, mode: str) -> Selection:
    """The Selection for keep [N, P] over a VisionContext's tokens under merge `mode`, within each
    image: tokens are matched by their vision features and averaged as projected features."""
    if mode == "none":
        return Selection(keep)
    return merge_into_kept(keep, ctx.vision.float(), ctx.features.float(), ctx.patches,
                           torch.ones_like(keep, dtype=torch.float), mode)


def merge_into_kept(keep: torch.Tensor, match: torch.Tensor, states: torch.Tensor, valid: torch.Tensor,
                    weights: torch.Tensor, mode: str) -> Selection:
    """keep [B, N] kept tokens; valid [B, N] the tokens that take part in merging (a dropped one
    outside it is dropped, a kept one outside it stays alone); match [B, N, Dm] what tokens are
    compared by (cosine); states [B, N, D] what kept tokens carry on (their groups' means,
    weighted by weights [B, N], the original tokens each stands for) -> Selection with values,
    groups and (`prop`) sizes."""
    unit = F.normalize(match, dim=-1)
    kept, kept_valid = candidates(keep & valid)  # [B, K] each row's kept tokens that take merges
    sim = (unit @ take(unit, kept).transpose(1, 2)).masked_fill(~kept_valid[:, None, :], float("-inf"))  # [B, N, K]
    index = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    nearest = kept.gather(1, sim.argmax(-1))  # [B, N] the most similar kept token
    alone = ~valid | ~kept_valid.any(1, keepdim=True)  # [B, N] nothing to merge into
    groups = torch.where(keep, index, nearest.masked_fill(alone, -1))
    values = mean_into(states, groups, keep.shape[1], weights)  # [B, N, D] each kept token's group mean
    sizes = weights.new_zeros(keep.shape).scatter_add_(1, groups.clamp(min=0), weights * (groups >= 0))
    return Selection(keep, values, groups, sizes if mode == "prop" else None)
