"""The decode step with fixed shapes, so that it can be compiled once and (on CUDA) captured.

The eager step (`LanguageModel.forward` with a cache) attends over the slots filled so far, so
its shapes grow by one every step and it builds its mask and slot range in Python. The *static*
step below attends over the whole preallocated cache instead — slots not yet written are invalid
in `cache.valid` and masked out — and writes the new key/value at a slot index held in a tensor.
Every step then has the same shapes: `torch.compile` traces it once per (batch, cache size,
stage layout), and on CUDA `mode="reduce-overhead"` replays it as a CUDA graph.

Decode modes (`fastllava.load(..., decode=...)`, `--decode`):
  eager     the plain step (default; any cache layout).
  static    the fixed-shape step, not compiled: same tokens, for checking and debugging.
  compiled  the fixed-shape step through torch.compile (CUDA graphs on CUDA). The first steps
            of a new shape pay the compilation; cache sizes are rounded up to CACHE_BUCKET
            slots so that prompts of different lengths share a compiled step.
Quantized KV caches (KIVI, VidKV) always decode eagerly: their writes pack codes in Python.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError
from .kvcache import StaticKVCache
from .models.llava import LlavaModel

DECODE_MODES = ("eager", "static", "compiled")
CACHE_BUCKET = 128  # compiled decoding rounds the cache size up to a multiple of this

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token [B], positions [B, 1]) -> logits [B, V]


def check_decode_mode(mode: str | None) -> str:
    mode = mode or "eager"
    if mode not in DECODE_MODES:
        raise UserError(f"unknown decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
    return mode


def cache_size(model: LlavaModel, needed: int) -> int:
    """Slots to allocate for `needed`: rounded up to CACHE_BUCKET when decoding is compiled."""
    if model.decode_mode != "compiled":
        return needed
    return -(-needed // CACHE_BUCKET) * CACHE_BUCKET


def new_cache(model: LlavaModel, batch: int, needed: int) -> StaticKVCache:
    """A cache of `batch` rows with room for `needed` slots (see cache_size).

    Compiled decoding reuses one full-precision cache per (batch, size): its buffers keep their
    addresses from one generation to the next, so that the CUDA graph recorded for that shape
    replays on them instead of being recorded again (or skipped, as graphs are for inputs that
    the step mutates unless their addresses are static). One generation at a time per model."""
    size = cache_size(model, needed)
    if model.decode_mode != "compiled" or model.kv_cache is not None:
        return model.new_cache(batch, size)
    cache = model._compiled_caches.get((batch, size))
    if cache is None:
        cache = model.new_cache(batch, size)
        for buffer in (*cache.k, *cache.v, cache.valid):
            torch._dynamo.mark_static_address(buffer)
        model._compiled_caches[(batch, size)] = cache
    cache.clear()
    return cache


def decode_step(model: LlavaModel, cache: StaticKVCache) -> Step:
    """The function that runs one decode step of `model` into `cache` (after its prefill)."""
    mode = model.decode_mode
    if mode == "eager" or type(cache) is not StaticKVCache:
        return lambda token, positions: model(model.language_model.embed_tokens(token[:, None]), positions,
                                              None, cache)[:, -1]
    fn = _compiled(model) if mode == "compiled" else static_step
    firsts = tuple(cache.stages)
    stage_of = tuple(sum(f <= i for f in firsts) - 1 for i in range(len(cache.lengths)))  # layer -> stage
    graphs = mode == "compiled" and cache.valid.device.type == "cuda"
    ones = torch.ones(cache.valid.shape[1], 1, dtype=torch.bool, device=cache.valid.device)  # [B, 1]

    def step(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        slots = [cache.reserve(first, ones)[0] for first in firsts]  # marks the new slot valid
        slot = torch.tensor(slots, dtype=torch.long).to(token.device, non_blocking=True)  # [stages]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are not read again
        return fn(model, cache, token, positions, slot, firsts, stage_of)

    return step


def static_step(model: LlavaModel, cache: StaticKVCache, token: torch.Tensor, positions: torch.Tensor,
                slot: torch.Tensor, firsts: tuple[int, ...], stage_of: tuple[int, ...]) -> torch.Tensor:
    """token [B], positions [B, 1], slot [stages] (the slot each stage writes, already reserved),
    firsts: each stage's first layer, stage_of: each layer's stage -> logits [B, V]. Attends over
    all cache slots; `cache.valid` masks the unwritten ones."""
    lm = model.language_model
    x = lm.embed_tokens(token[:, None])  # [B, 1, D]
    cos, sin = lm.rotary(positions, x.dtype)
    for i, layer in enumerate(lm.layers):
        stage = stage_of[i]
        mask = cache.valid[firsts[stage]][:, None, None, :]  # [B, 1, 1, S]
        x = layer(x, cos, sin, mask, cache, i, slot[stage:stage + 1])
    return model.lm_head(lm.norm(x))[:, -1]


def _compiled(model: LlavaModel):
    """static_step through torch.compile, made once per model."""
    compiled = model._compiled_step
    if compiled is None:
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        compiled = torch.compile(static_step, dynamic=False, mode=mode)
        model._compiled_step = compiled
    return compiled
