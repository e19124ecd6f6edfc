"""`visionzip`: dominant tokens by class-token attention, plus contextual tokens merged by key
similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Method, Selection, VisionContext, mean_into, top_mask
from .registry import register


@register
@dataclass
class VisionZip(Method):
    """Before the projector, keep `keep - contextual` *dominant* patches (highest [CLS] attention,
    averaged over heads, in the selected layer); of the other patches, take `contextual` targets
    evenly spaced in order, assign every other remaining patch to the target whose key (that
    layer's keys, heads concatenated) is most cosine-similar, and replace each target by the mean
    of its group. `contextual=-1` uses the paper's split (10 of 64, 20 of 128, 30 of 192: keep*10//64).

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    arXiv:2412.04467, 2024.
    """

    name = "visionzip"
    paper = "Yang et al. 2024, VisionZip: Longer is Better but Not Necessary in VLMs (arXiv:2412.04467)"
    needs_cls = True

    keep: int = 64
    contextual: int = -1

    def split(self) -> tuple[int, int]:
        """(dominant, contextual) token counts."""
        ctx = self.keep * 10 // 64 if self.contextual < 0 else self.contextual
        return self.keep - ctx, ctx

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        super().check(tokens, num_layers, grid)
        if self.contextual >= self.keep:
            raise UserError(f"{self.spec()}: contextual must be below keep (at least one dominant token), "
                            f"or -1 for the paper's split")

    def select(self, ctx: VisionContext) -> Selection:
        n, p, _ = ctx.vision.shape
        n_dom, n_ctx = self.split()
        everything = ctx.cls_attention.new_ones(n, p, dtype=torch.bool)
        dominant = top_mask(ctx.cls_attention, everything, n_dom)  # [N, P]
        rest = (~dominant).nonzero()[:, 1].view(n, p - n_dom)  # [N, R] remaining patches, in order
        r = rest.shape[1]
        if n_ctx >= r:  # every remaining patch fits: nothing to merge
            return Selection(dominant | ~dominant)
        if n_ctx == 0:
            return Selection(dominant)
        step = max(r // n_ctx, 1)
        pick = torch.arange(0, r, step, device=rest.device)[:n_ctx]  # [C] evenly spaced targets
        keys = F.normalize(ctx.keys.float().gather(1, rest[..., None].expand(-1, -1, ctx.keys.shape[-1])), dim=-1)
        sim = keys @ keys[:, pick].transpose(1, 2)  # [N, R, C]
        assign = sim.argmax(-1)  # [N, R]
        assign[:, pick] = torch.arange(n_ctx, device=rest.device)  # a target stays in its own group
        vision = ctx.vision.gather(1, rest[..., None].expand(-1, -1, ctx.vision.shape[-1]))  # [N, R, Dv]
        merged = mean_into(vision.float(), assign, n_ctx).to(ctx.vision.dtype)  # [N, C, Dv]
        targets = rest[:, pick]  # [N, C]
        keep = dominant.clone()
        keep.scatter_(1, targets, True)
        values = ctx.features.clone()
        values.scatter_(1, targets[..., None].expand(-1, -1, values.shape[-1]), ctx.project(merged).to(values.dtype))
        groups = torch.arange(p, device=rest.device)[None].expand(n, -1).clone()
        groups.scatter_(1, rest, targets.gather(1, assign))
        return Selection(keep, values, groups)
