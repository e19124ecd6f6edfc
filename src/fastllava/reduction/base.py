"""What a reduction method is and what it sees.

A method is a small typed dataclass. Methods that act *before* the language model (`where =
"vision"`) get a VisionContext per batch of images; methods that act *inside* it (`where =
"llm"`) get a LayerContext after each of their cut layers. Both answer with a Selection: a mask
of the candidate visual tokens to keep and, for methods that merge, the merged states that the
kept tokens carry from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch

from ..errors import UserError


@dataclass
class Selection:
    keep: torch.Tensor  # [N, P] bool: candidates kept
    values: torch.Tensor | None = None  # [N, P, D]: states of the kept candidates (merges), or None
    groups: torch.Tensor | None = None  # [N, P] long: the kept candidate each one merged into, -1 dropped


@dataclass
class VisionContext:
    """Hook (a), before the language model; one row per image."""

    vision: torch.Tensor  # [N, P, Dv] selected vision features, before the projector
    features: torch.Tensor  # [N, P, D] projected features (what the LLM would receive)
    cls_attention: torch.Tensor | None  # [N, P] class-token attention at the selected layer (heads averaged)
    keys: torch.Tensor | None  # [N, P, Dv] keys of that layer's attention
    text: torch.Tensor  # [N, T, D] embeddings of the prompt each image belongs to
    text_valid: torch.Tensor  # [N, T] real text tokens of that prompt
    grid: int  # patches per side (P = grid**2, plus 1 with the "full" strategy's class token)
    budget: int  # tokens to keep per image
    project: Callable[[torch.Tensor], torch.Tensor]  # [N, k, Dv] -> [N, k, D]


@dataclass
class LayerContext:
    """Hook (b), after layer `layer` of the language model; candidates are the visual tokens of
    each row, gathered into [B, N] (rows with fewer are padded, `cand_valid` False there)."""

    layer: int  # index of the layer just run
    cut: int  # which of the method's cuts this is (0, 1, ...)
    hidden: torch.Tensor  # [B, T, D] hidden states after the layer
    probs: torch.Tensor | None  # [B, H, T, T] that layer's attention (float32), if the method needs it
    keys: torch.Tensor  # [B, Hkv, T, Dh] that layer's keys (after RoPE)
    valid: torch.Tensor  # [B, T] real tokens
    visual: torch.Tensor  # [B, T] visual tokens (a subset of valid)
    cand: torch.Tensor  # [B, N] long: index in T of each candidate
    cand_valid: torch.Tensor  # [B, N]
    budget: torch.Tensor  # [B] long: candidates to keep per row

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] -> the candidates' rows [B, N, ...]."""
        idx = self.cand.view(*self.cand.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)

    def last_attention(self) -> torch.Tensor:
        """[B, T]: the attention the last prompt token pays each token, averaged over heads (with
        left padding the last token of every row is real)."""
        return self.probs[:, :, -1].mean(1)

    @property
    def text(self) -> torch.Tensor:
        """[B, T] real tokens that are not visual."""
        return self.valid & ~self.visual


@dataclass
class Method:
    """Base of all methods. Subclasses are dataclasses whose fields are the spec's parameters;
    `keep` is the number of visual tokens kept per image."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    where: ClassVar[str] = "vision"  # "vision" (before the LLM) or "llm" (inside it)
    needs_cls: ClassVar[bool] = False  # VisionContext.cls_attention / keys
    needs_attention: ClassVar[bool] = False  # LayerContext.probs

    keep: int = 64

    def spec(self) -> str:
        params = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self))
        return f"{self.name}:{params}" if params else self.name

    def budgets(self) -> list[int]:
        """Visual tokens per image after each cut."""
        return [self.keep]

    def cuts(self) -> list[int]:
        """Indices of the LLM layers after which the method cuts (llm methods)."""
        return []

    def bind(self, num_layers: int) -> "Method":
        """The method with defaults that depend on the model's depth filled in."""
        return self

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        """Raise UserError when the method cannot run on a model with `tokens` visual tokens per
        image (a grid x grid patch grid) and `num_layers` decoder layers."""
        for b in self.budgets():
            if b < 1 or b > tokens:
                raise UserError(f"{self.spec()}: budget {b} is outside 1..{tokens} (the visual tokens per image)")
        for c in self.cuts():
            if not 0 <= c < num_layers - 1:
                raise UserError(f"{self.spec()}: layer {c + 1} is outside 1..{num_layers - 1} for a "
                                f"{num_layers}-layer language model")

    def select(self, ctx) -> Selection:
        raise NotImplementedError


def _fmt(value) -> str:
    return "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def top_mask(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor | int) -> torch.Tensor:
    """The `budget` highest scores of each row among the valid entries (ties: lower index first).
    scores, valid [B, N]; budget int or [B] -> keep mask [B, N]."""
    scores = scores.float().masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [B, N]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    budget = torch.as_tensor(budget, device=scores.device).reshape(-1, 1)
    return (rank < budget) & valid


def mean_into(states: torch.Tensor, assign: torch.Tensor, slots: int) -> torch.Tensor:
    """Average rows of states [N, M, D] into `slots` groups by assign [N, M] (values in
    0..slots-1, or -1 for none) -> [N, slots, D] (zeros for an empty group)."""
    n, _, d = states.shape
    ok = assign >= 0
    idx = assign.clamp(min=0)[..., None].expand(-1, -1, d)
    sums = states.new_zeros(n, slots, d).scatter_add_(1, idx, states * ok[..., None])
    counts = states.new_zeros(n, slots).scatter_add_(1, assign.clamp(min=0), ok.to(states.dtype))
    return sums / counts.clamp(min=1)[..., None]
