"""`visiondrop`: progressive dropping inside the vision tower by visual-to-visual attention, with
the dropped tokens merged into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.vision import Probe, Shrink, Tokens
from .base import TowerMethod, top_mask
from .registry import register


def received(attention: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The attention each patch receives from the patches (visual-to-visual; the class token is
    neither a rater nor rated): attention [N, T, T] (heads averaged), patches [N, T] -> [N, T]."""
    rows = attention * patches[:, :, None]  # only patch queries
    return rows.sum(1) / patches.sum(1, keepdim=True).clamp(min=1) * patches


def nearest_kept(keys: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """into [N, T] (see Shrink): kept tokens stay, every other patch joins the kept patch whose key
    (keys [N, T, Dk]) is most cosine-similar."""
    u = F.normalize(keys.float(), dim=-1)
    sim = (u @ u.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))  # [N, T, T]
    place = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return torch.where(keep, place, torch.where(patches, sim.argmax(-1), -1))


@dataclass
class DropPlan:
    """One tower run of VisionDrop (see VisionDrop)."""

    stages: dict[int, int]  # vision block -> patches left after it
    merge: bool

    def wants(self, block: int) -> tuple[str, ...]:
        return ("attention", "keys") if block in self.stages else ()

    def step(self, block: int, x: torch.Tensor, probe: Probe | None, tokens: Tokens) -> Shrink | None:
        if probe is None:
            return None
        patches = tokens.alive & (tokens.index > 0)  # [N, T]
        keep = top_mask(received(probe.attention, patches), patches, self.stages[block])
        if not self.merge:
            place = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
            return Shrink(torch.where(keep, place, -1))
        keys = probe.keys.transpose(1, 2).flatten(2)  # [N, T, H*Dh]
        return Shrink(nearest_kept(keys, keep, patches), merge=True)


@register
@dataclass
class VisionDrop(TowerMethod):
    """Drop patch tokens in stages inside the vision tower, ranked by visual-to-visual attention
    alone (no text), down to `keep` by the block that gives the selected features.

    After each stage's block (`layers`, vision blocks 1-based; default: a third, two thirds and all
    of the way to the selected block) the patches are rated by the attention they receive from the
    other patches in that block (every patch query's attention, heads averaged; the class token
    neither rates nor is rated), computed explicitly beside the fused attention in those blocks
    only. The dominant patches are kept, their count falling geometrically from all patches to
    `keep` over the stages; every other patch is merged into the kept patch whose key (that block's,
    heads concatenated) is most similar, the kept one going on as the size-weighted mean of its
    group (`merge=mean`, the paper's lightweight contextual merging; `merge=none` drops them).

    The paper also continues the same visual-only selection at cut layers inside the language model;
    that stage is not part of this method (it reduces before the LLM only). The stage layers and the
    geometric schedule are our defaults. LLaVA-1.5 only.

    Xu et al., "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment"
    (VisionDrop), arXiv:2506.22283, 2025.
    """

    name = "visiondrop"
    paper = "Xu et al. 2025, Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop, arXiv:2506.22283)"

    keep: int = 64
    layers: list[int] = field(default_factory=list)
    merge: str = "mean"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.merge not in ("mean", "none"):
            raise UserError(f"{self.spec()}: merge must be mean or none")
        if self.layers and (sorted(set(self.layers)) != list(self.layers) or self.layers[0] < 1):
            raise UserError(f"{self.spec()}: layers must be increasing vision blocks from 1, e.g. layers=8-16-23")
        super().check(tokens, num_layers, grid)

    def stages(self, depth: int, patches: int) -> dict[int, int]:
        """Vision block -> patches left after it."""
        layers = self.layers or sorted({max(1, depth * q // 3) for q in (1, 2, 3)})
        if layers[-1] > depth:
            raise UserError(f"{self.spec()}: vision block {layers[-1]} is after block {depth}, which gives the "
                            f"selected features")
        s = len(layers)
        return {b: max(self.keep, round(patches * (self.keep / patches) ** ((i + 1) / s))) for i, b in enumerate(layers)}

    def plan(self, depth: int, patches: int) -> DropPlan:
        stages = self.stages(depth, patches)
        stages[max(stages)] = self.keep
        return DropPlan(stages, self.merge == "mean")


