"""`visiondrop`: progressive dropping inside the vision tower by visual-to-visual attention, with
the dropped tokens merged into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.vision import Probe, Shrink, Tokens
from .base import LayerContext, Selection, TowerMethod, VisionContext, top_mask
from .merging import merge_dropped
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


def received_causal(probs: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Inside the language model: the attention each token receives from the visual tokens
    (probs [B, H, T, T], visual [B, T]), heads averaged, divided by the visual tokens that can see
    it under causal attention (itself and those after it) so that late tokens are not disfavoured
    for having fewer raters -> [B, T]."""
    rows = probs.float().mean(1) * visual[:, :, None]  # [B, T, T] visual queries only
    raters = visual.flip(1).cumsum(1).flip(1)  # [B, T] visual tokens at or after each place
    return rows.sum(1) / raters.clamp(min=1)


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

    With `llm` (decoder layers, 1-based, e.g. `llm=2`) the same visual-only selection continues
    inside the language model, as the paper's pipeline does: after each of those layers the visual
    tokens are rated by the attention they receive from the visual tokens (that layer's attention,
    computed explicitly for it alone; divided by the visual tokens that can see each one under
    causal attention, ours), keep * llm_ratio, keep * llm_ratio^2, ... are kept and the others merged
    into the most similar kept one by hidden state (`merge=mean`) or dropped. The stage layers, the
    geometric schedules and `llm_ratio=0.5` are our defaults; by default (`llm` empty) it reduces
    before the LLM only. LLaVA-1.5 only.

    Xu et al., "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment"
    (VisionDrop), arXiv:2506.22283, 2025.
    """

    name = "visiondrop"
    paper = "Xu et al. 2025, Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop, arXiv:2506.22283)"
    needs_attention = True  # at its cuts inside the LLM (llm=...), every query's attention
    empty_lists = {"llm": "none"}

    keep: int = 64
    layers: list[int] = field(default_factory=list)
    merge: str = "mean"
    llm: list[int] = field(default_factory=list)
    llm_ratio: float = 0.5

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.merge not in ("mean", "none"):
            raise UserError(f"{self.spec()}: merge must be mean or none")
        if self.layers and (sorted(set(self.layers)) != list(self.layers) or self.layers[0] < 1):
            raise UserError(f"{self.spec()}: layers must be increasing vision blocks from 1, e.g. layers=8-16-23")
        if sorted(set(self.llm)) != list(self.llm):
            raise UserError(f"{self.spec()}: llm must be increasing decoder layers, e.g. llm=2-16")
        if not 0 < self.llm_ratio <= 1:
            raise UserError(f"{self.spec()}: llm_ratio must be in (0, 1]")
        super().check(tokens, num_layers, grid)

    def budgets(self) -> list[int]:
        return [self.keep] + [max(1, round(self.keep * self.llm_ratio ** (i + 1))) for i in range(len(self.llm))]

    def cuts(self) -> list[int]:
        return [k - 1 for k in self.llm]

    def select(self, ctx: VisionContext | LayerContext) -> Selection:
        if isinstance(ctx, VisionContext):
            return super().select(ctx)
        scores = received_causal(ctx.probs, ctx.visual).gather(1, ctx.cand)  # [B, N]
        return merge_dropped(ctx, top_mask(scores, ctx.cand_valid, ctx.budget), self.merge)

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


