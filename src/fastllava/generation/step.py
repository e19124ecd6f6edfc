"""The one decode step: T new tokens per row (T = 1 to decode; 1 + k drafted tokens to verify a
speculation) through the layers, into the KV cache."""

from __future__ import annotations

from typing import Callable

import torch

from ..models.llava import LlavaModel
from ..ops import attention_mask

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token [B], positions [B, 1]) -> logits [B, V]


def decode_step(model: LlavaModel, cache, tokens: torch.Tensor, positions: torch.Tensor,
                slots: list[int] | torch.Tensor, spans: tuple[int, ...], firsts: tuple[int, ...],
                skip: frozenset = frozenset()) -> torch.Tensor:
    """tokens [B, T] at positions [B, T] -> logits [B, T, V]. The cache's stages start at layers
    `firsts` (one stage unless a reduction cut inside the language model); stage s writes the T
    keys/values at slots slots[s].. (already reserved; ints, or a tensor [stages] for a fixed-shape
    step) and attends to its first spans[s] slots, of which `cache.valid` masks those not (yet)
    holding a real token: slots past the ones written are not reserved yet, so with one token
    validity alone is causal. A sliding window is a mask over slot positions. Layers in `skip` are
    left out (a self-speculative draft)."""
    lm = model.language_model
    t = tokens.shape[1]
    x = lm.embed_tokens(tokens)  # [B, T, D]
    cos, sin = lm.rotary(positions, x.dtype)
    window = model.cfg.text.sliding_window
    bounds = (*firsts, len(lm.layers))
    for s, (first, stop) in enumerate(zip(bounds, bounds[1:])):
        slot = slots[s:s + 1] + torch.arange(t, device=slots.device) if isinstance(slots, torch.Tensor) else slots[s]
        span = spans[s]
        key_valid, bias = cache.valid[first][:, :span], cache.key_bias(first, span)  # [B, S], [B, S] or None
        if t == 1 and window is None and bias is None:
            mask = key_valid[:, None, None, :]  # [B, 1, 1, S]
        else:
            start = slot[:1] if isinstance(slot, torch.Tensor) else slot
            mask = attention_mask(key_valid, start, t, span, window, bias, x.dtype)  # [B, 1, T, S]
        layers = [i for i in range(first, stop) if i not in skip]
        x = lm.run(x, cos, sin, mask, cache, slot, span, layers)[0]
    return model.head(x)  # [B, T, V]
