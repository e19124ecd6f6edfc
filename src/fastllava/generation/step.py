"""The one decode step: a token per row through every layer, into the KV cache."""

from __future__ import annotations

from typing import Callable

import torch

from ..models.llava import LlavaModel
from ..ops import attention_mask

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token [B], positions [B, 1]) -> logits [B, V]


def decode_step(model: LlavaModel, cache, token: torch.Tensor, positions: torch.Tensor,
                slots: list[int] | torch.Tensor, spans: tuple[int, ...], firsts: tuple[int, ...]) -> torch.Tensor:
    """token [B] at positions [B, 1] -> logits [B, V]. The cache's stages start at layers `firsts`
    (one stage unless a reduction cut inside the language model); stage s writes its key/value at
    slots[s] (already reserved; ints, or a tensor [stages] for a fixed-shape step) and attends to
    its first spans[s] slots, of which `cache.valid` masks those not (yet) holding a real token.
    Slots past the one written are not reserved yet, so validity alone is causal; a sliding window
    is a mask over slot positions."""
    lm = model.language_model
    x = lm.embed_tokens(token[:, None])  # [B, 1, D]
    cos, sin = lm.rotary(positions, x.dtype)
    window = model.cfg.text.sliding_window
    bounds = (*firsts, len(lm.layers))
    for s, (first, stop) in enumerate(zip(bounds, bounds[1:])):
        slot, span = (slots[s:s + 1] if isinstance(slots, torch.Tensor) else slots[s]), spans[s]
        key_valid, bias = cache.valid[first][:, :span], cache.key_bias(first, span)  # [B, S], [B, S] or None
        if window is None and bias is None:
            mask = key_valid[:, None, None, :]  # [B, 1, 1, S]
        else:
            mask = attention_mask(key_valid, slot, 1, span, window, bias, x.dtype)
        x = lm.run(x, cos, sin, mask, cache, slot, span, first, stop)[0]
    return model.head(x)[:, -1]
