"""`visionzip`: dominant tokens by class-token attention, plus contextual tokens merged by key
similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Selection, VisionContext, VisionMethod, candidates, mean_into, take
from .registry import register


@register
@dataclass
class VisionZip(VisionMethod):
    """Before the projector, keep `keep - contextual` *dominant* patches (highest [CLS] attention,
    averaged over heads, in the selected layer); of the other patches, take `contextual` targets
    evenly spaced in order, assign every other remaining patch to the target whose key (that
    layer's keys, heads concatenated) is most cosine-similar, and replace each target by the mean
    of its group. `contextual=-1` uses the paper's split (10 of 64, 20 of 128, 30 of 192: keep*10//64).
    On LLaVA-NeXT the dominant tokens are chosen per tile (the budget shared among the base image
    and the tiles in proportion to their tokens, see reduction.base) and the contextual tokens
    merge the remaining patches of the whole image (keys of one layer compare across tiles);
    an image with at most `contextual` patches left keeps its best `keep` tokens unmerged.
    `merge=mean` is the paper's method; `merge=prop` also gives each contextual token ToMe's
    proportional attention in the language model (log of its group's size added to its key's
    attention logits, see reduction.merging).

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    arXiv:2412.04467, 2024.
    """

    name = "visionzip"
    paper = "Yang et al. 2024, VisionZip: Longer is Better but Not Necessary in VLMs (arXiv:2412.04467)"
    needs_cls = True
    merge_modes = ("mean", "prop")  # mean: the paper's; prop: with proportional attention

    keep: int = 64
    contextual: int = -1
    merge: str = "mean"

    def split(self) -> tuple[int, int]:
        """(dominant, contextual) token counts."""
        ctx = self.keep * 10 // 64 if self.contextual == -1 else self.contextual
        return self.keep - ctx, ctx

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        super().check(tokens, num_layers, grid)
        if self.contextual < -1 or self.contextual >= self.keep:
            raise UserError(f"{self.spec()}: contextual must be in 0..keep-1 ({self.keep - 1}: at least one dominant "
                            f"token), or -1 for the paper's split")

    def select(self, ctx: VisionContext) -> Selection:
        n, p, _ = ctx.vision.shape
        n_dom, n_ctx = self.split()
        dominant = ctx.top(ctx.cls_attention, n_dom)  # [N, P]
        if n_ctx == 0:
            return Selection(dominant)
        rest, rest_valid = candidates(ctx.patches & ~dominant)  # [N, R] each image's other patches, in order
        merge = rest_valid.sum(1) > n_ctx  # [N] images with patches to merge; the others keep their best `keep`
        plain = ctx.top(ctx.cls_attention, self.keep)
        if not bool(merge.any()):
            return Selection(plain)
        step = (rest_valid.sum(1) // n_ctx).clamp(min=1)  # [N]
        pick = torch.arange(n_ctx, device=rest.device)[None] * step[:, None]  # [N, C] evenly spaced targets
        keys = F.normalize(take(ctx.keys.float(), rest), dim=-1)  # [N, R, Dv]
        sim = keys @ take(keys, pick).transpose(1, 2)  # [N, R, C]
        assign = sim.argmax(-1)  # [N, R]
        assign.scatter_(1, pick, torch.arange(n_ctx, device=rest.device).expand(n, -1))  # a target stays in its group
        assign = assign.masked_fill(~rest_valid | ~merge[:, None], -1)
        merged = mean_into(take(ctx.vision, rest).float(), assign, n_ctx).to(ctx.vision.dtype)  # [N, C, Dv]
        targets = rest.gather(1, pick)  # [N, C]
        keep = dominant.clone()
        keep.scatter_(1, targets, True)
        values = ctx.features.clone()
        values.scatter_(1, targets[..., None].expand(-1, -1, values.shape[-1]), ctx.project(merged).to(values.dtype))
        own = torch.arange(p, device=rest.device)[None].expand(n, -1)
        groups = own.masked_fill(~dominant, -1)
        i, j = rest_valid.nonzero(as_tuple=True)
        groups[i, rest[i, j]] = targets.gather(1, assign.clamp(min=0))[i, j]
        m = merge[:, None]
        groups = torch.where(m, groups, own.masked_fill(~plain, -1))
        sizes = None
        if self.merge == "prop":  # tokens in each kept token's group
            sizes = torch.zeros(n, p, device=rest.device).scatter_add_(1, groups.clamp(min=0), (groups >= 0).float())
        return Selection(torch.where(m, keep, plain), torch.where(m[..., None], values, ctx.features), groups, sizes)

