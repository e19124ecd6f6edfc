"""`flowcut`: progressive pruning inside the vision tower by a cumulative information-flow score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.vision import Probe, Shrink, Tokens
from .base import TowerMethod, top_mask
from .registry import register


def flow_scores(probe: Probe, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's information-flow score of every token and the class token's attention over the
    patches. probe: the block's class-token attention `cls` [N, H, T] and `values` [N, H, T, Dh];
    patches [N, T] the live patch tokens -> (score [N, T], attention [N, T], both 0 off the patches).

    score = (a + s) * |v|_1: a the class token's attention (heads averaged), s its semantic relevance
    (softmax over the patches of the class token's value dotted with each value, heads averaged),
    both renormalised to sum 1 over the patches, and |v|_1 the L1 norm of the token's value vector
    (heads averaged), its information density."""
    attention = (probe.cls.mean(1) * patches).clamp(min=0)  # [N, T]
    attention = attention / attention.sum(1, keepdim=True).clamp(min=1e-12)
    v = probe.values  # [N, H, T, Dh]
    sim = (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0]  # [N, H, T] class value . each value
    sim = sim.masked_fill(~patches[:, None, :], float("-inf"))
    semantic = sim.softmax(-1).mean(1).nan_to_num(0.0)  # [N, T]
    semantic = semantic / semantic.sum(1, keepdim=True).clamp(min=1e-12)
    density = v.mean(1).abs().sum(-1)  # [N, T]
    return (attention + semantic) * density * patches, attention


def adaptive_count(attention: torch.Tensor, patches: torch.Tensor, target: int, left: int) -> torch.Tensor:
    """Patches to keep per row [N] after a pruning block with `left` blocks still to run before the
    selected layer: prune r = (n - target) / sqrt(left) * (1 - (H / log n)^2) of the n live patches,
    H the entropy of the class token's attention over them (a concentrated attention, low H, prunes
    more); the last pruning block (left = 0) prunes down to target."""
    n = patches.sum(1)  # [N]
    if left == 0:
        return torch.full_like(n, target)
    p = attention.clamp(min=1e-12)
    entropy = -(p * p.log() * patches).sum(1)  # [N]
    ratio = entropy / n.double().log().clamp(min=1e-12)
    r = ((n - target) / math.sqrt(left) * (1 - ratio ** 2)).round().long()  # [N]
    return torch.maximum(n - r.clamp(min=0), torch.full_like(n, target))


@dataclass
class FlowPlan:
    """One tower run of FlowCut (see FlowCut); holds the cumulative scores by original token."""

    target: int
    depth: int
    every: int
    cumulative: torch.Tensor | None = None  # [N, T0] cumulative score of each original token

    def wants(self, block: int) -> tuple[str, ...]:
        return ("cls", "values")

    def step(self, block: int, x: torch.Tensor, probe: Probe, tokens: Tokens) -> Shrink | None:
        if block > self.depth:
            return None
        patches = tokens.alive & (tokens.index > 0)  # [N, T]
        score, attention = flow_scores(probe, patches)
        if self.cumulative is None:
            self.cumulative = torch.zeros(tokens.owner.shape, dtype=score.dtype, device=score.device)
            self.cumulative.scatter_(1, tokens.index, score)
        else:
            now = self.cumulative.gather(1, tokens.index)
            self.cumulative.scatter_(1, tokens.index, torch.where(patches, 0.5 * now + 0.5 * score, now))
        left = self.depth - block
        if left % self.every or int(patches.sum(1).min()) <= self.target and left:
            return None
        keep = top_mask(self.cumulative.gather(1, tokens.index), patches,
                        adaptive_count(attention.double(), patches, self.target, left))
        place = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        return Shrink(torch.where(keep, place, -1))


@register
@dataclass
class FlowCut(TowerMethod):
    """Prune the patch tokens progressively inside the vision tower, down to `keep` by the block
    that gives the selected features, ranking them by a cumulative information-flow score.

    After every vision block the class token, the relay through which information flows between
    the patches, rates each patch (see flow_scores): its attention to the patch plus its semantic
    relevance to the patch (class value . patch value, softmax), times the patch's information
    density (L1 norm of its value vector). The ratings are accumulated across blocks,
    C_l = (C_{l-1} + s_l) / 2, so that no single block decides. Pruning happens every `every`-th
    block counting back from the selected one (the authors use every second); at each it removes
    (n - keep) / sqrt(blocks left) * (1 - (H / H_max)^2) of the n live patches, where H is the
    entropy of the class token's attention (concentrated attention, where redundancy has emerged,
    prunes more), and the selected block's step prunes to exactly `keep`. Only the class token's
    attention row is computed beside the fused attention (ClsInfo's way), in every block.

    Counts are per image (the authors' code takes the largest count of the batch, which makes an
    image's result depend on its batch; the paper describes one image): rows of a batch may hold
    different counts in the tower, padded and masked. Dropped patches are gone. LLaVA-1.5 (CLIP
    tower, which has a class token) only.

    Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
    Vision-Language Models", NeurIPS 2025, arXiv:2505.19536.
    """

    name = "flowcut"
    paper = "Tong et al. 2025, FlowCut: Rethinking Redundancy via Information Flow for Efficient VLMs (NeurIPS 2025, arXiv:2505.19536)"
    reads_cls = True

    keep: int = 64
    every: int = 2

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.every < 1:
            raise UserError(f"{self.spec()}: every (blocks between pruning steps) must be at least 1")
        super().check(tokens, num_layers, grid)

    def plan(self, depth: int, patches: int) -> FlowPlan:
        return FlowPlan(self.keep, depth, self.every)
