"""Sampling parameters and the sampling of one token per row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError

MIN_TEMPERATURE = 1e-4  # lower temperatures are greedy (dividing logits by less can overflow to inf/NaN)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # 0 = greedy (only the most likely token is kept)
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _number_in(self.temperature, 0, 100):
            raise UserError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not _number_in(self.top_p, 0, 1):
            raise UserError(f"top_p must be a number in [0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise UserError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_p == 0


def _number_in(x, low: float, high: float) -> bool:
    """Whether x is a real number (not a bool, not NaN) within [low, high]."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> the distribution [..., V] (float32) sampling draws from: temperature,
    then top-k, then top-p (always keeping the most likely token). Not for greedy parameters."""
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # and always the most likely token (a top_p that rounds to 0 in float32)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy below MIN_TEMPERATURE, else temperature, top-k, top-p."""
    if p.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, p), 1, generator=generator)[:, 0]


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The seeded generator a sampled generation draws from (None when greedy)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed % 2**64 if params.seed is not None else int(torch.seed() % 2**63))
    return generator
