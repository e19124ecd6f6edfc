"""`pitome`: energy-guided bipartite token merging inside the vision tower (spectrum-preserving)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.vision import Probe, Shrink, Tokens
from .base import TowerMethod
from .registry import register


def counts(start: int, target: int, blocks: int) -> list[int]:
    """Patches left after each of `blocks` merging blocks: a geometric path from start to target,
    never below half of the previous count (a bipartite merge at most halves), ending at target."""
    out, n = [], start
    for b in range(1, blocks + 1):
        n = max(math.ceil(n / 2), round(start * (target / start) ** (b / blocks)))
        out.append(n)
    return out


def cosines(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [N, T, T] of keys [N, T, Dh]."""
    u = F.normalize(keys.float(), dim=-1)
    return u @ u.transpose(1, 2)


def energy(cos: torch.Tensor, live: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """PiToMe's energy of each token from its keys' cosine similarities cos [N, T, T] among the live
    [N, T] tokens: E_i = mean over live j != i of f(cos_ij), f(x) = x where x >= margin, else
    alpha * (exp(x - margin) - 1). High energy: many close neighbours (redundant); low: isolated."""
    f = torch.where(cos >= margin, cos, (cos - margin).expm1_().mul_(alpha))  # [N, T, T]
    f.diagonal(dim1=1, dim2=2).zero_()
    w = live.to(f.dtype)[..., None]  # [N, T, 1]
    return (f @ w)[..., 0] / (w.sum(1) - 1).clamp(min=1)


def bipartite(cos: torch.Tensor, score: torch.Tensor, live: torch.Tensor, merges: torch.Tensor) -> torch.Tensor:
    """Merge merges [N] tokens per row: the 2*merges live tokens of highest score [N, T] are split
    alternately (by rank) into sources A and destinations B; every source joins its most similar
    destination (cos [N, T, T]); the others stay. -> into [N, T] (see Shrink)."""
    n, t = live.shape
    place = torch.arange(t, device=live.device).expand(n, -1)
    order = score.masked_fill(~live, float("-inf")).argsort(dim=1, descending=True, stable=True)  # [N, T]
    rank = torch.empty_like(order).scatter_(1, order, place)
    cand = live & (rank < 2 * merges[:, None])
    src = cand & (rank % 2 == 0)
    dst = cand & (rank % 2 == 1)
    best = cos.masked_fill(~dst[:, None, :], float("-inf")).argmax(-1)  # [N, T] most similar destination
    return torch.where(src, best, place)


@dataclass
class PiToMePlan:
    """One tower run of PiToMe (see PiToMe)."""

    path: list[int]  # patches left after blocks first, first+1, ..., depth
    first: int
    depth: int
    alpha: float

    def wants(self, block: int) -> tuple[str, ...]:
        return ("keys",) if self.first <= block <= self.depth else ()

    def step(self, block: int, x: torch.Tensor, probe: Probe | None, tokens: Tokens) -> Shrink | None:
        if probe is None:
            return None
        patches = tokens.alive & (tokens.index > 0)  # [N, T] the class token never merges
        merges = patches.sum(1) - self.path[block - self.first]  # [N]
        if int(merges.max()) <= 0:
            return None
        cos = cosines(probe.keys.mean(1))  # [N, T, T] of the keys, heads averaged
        margin = 0.9 - 0.9 * block / self.depth
        into = bipartite(cos, energy(cos, patches, margin, self.alpha), patches, merges.clamp(min=0))
        return Shrink(into, merge=True, prop=True)


@register
@dataclass
class PiToMe(TowerMethod):
    """Merge the patch tokens inside the vision tower, down to `keep` by the block that gives the
    selected features, guided by an energy score that protects isolated tokens.

    In each merging block (the last `blocks` before the selected one; 0: all of them) every patch
    gets an energy from its keys (heads averaged): the mean over the other patches of f(cos), with
    f(x) = x above a margin and alpha * (exp(x - margin) - 1) below it, the margin falling with
    depth (0.9 - 0.9 * block / depth). Tokens in large groups of similar ones have high energy and
    are merged; isolated tokens (low energy), whose loss would change the spectrum of the token
    graph most, are left alone. The 2k patches of highest energy are split alternately into two
    sets; each token of the first joins its most similar token of the second (bipartite matching,
    as ToMe) and every kept token goes on as the size-weighted mean of its group. The counts follow
    a geometric path to `keep` (at most halving per block). Merged tokens draw proportional attention
    (log of their size added to their attention logits) in the later vision blocks, and with
    `prop=all` in the language model too (`prop=tower`, the default, is the paper's LLaVA setting,
    which hands the merged tokens to the LLM as they are).

    The paper merges between a block's attention and its MLP; here the merge follows the block
    (the one hook of the tower), with the same keys. The class token never merges. LLaVA-1.5 only.

    Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging" (PiToMe),
    NeurIPS 2024, arXiv:2405.16148.
    """

    name = "pitome"
    paper = "Tran et al. 2024, Accelerating Transformers with Spectrum-Preserving Token Merging (PiToMe, NeurIPS 2024, arXiv:2405.16148)"

    keep: int = 64
    blocks: int = 0
    alpha: float = 1.0
    prop: str = "tower"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.prop not in ("tower", "all"):
            raise UserError(f"{self.spec()}: prop must be tower or all")
        if self.blocks < 0:
            raise UserError(f"{self.spec()}: blocks (merging blocks before the selected one) must be at least 0 (0: all)")
        if self.alpha <= 0:
            raise UserError(f"{self.spec()}: alpha must be more than 0")
        super().check(tokens, num_layers, grid)

    def llm_sizes(self) -> bool:
        return self.prop == "all"

    def plan(self, depth: int, patches: int) -> PiToMePlan:
        blocks = depth if self.blocks == 0 else min(self.blocks, depth)
        if self.keep < math.ceil(patches / 2 ** blocks):
            raise UserError(f"{self.spec()}: {blocks} merging blocks can at most halve {patches} patches "
                            f"{blocks} times, to {math.ceil(patches / 2 ** blocks)}; raise keep or blocks")
        return PiToMePlan(counts(patches, self.keep, blocks), depth - blocks + 1, depth, self.alpha)
