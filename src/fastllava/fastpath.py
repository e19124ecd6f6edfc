"""Prefill and decode steps with fixed shapes, so that they can be compiled once per shape and
(on CUDA) captured as CUDA graphs.

The eager step (`LanguageModel.forward` with a cache) attends over the slots filled so far, so
its shapes grow by one every step and it builds its mask and slot range in Python. The *static*
step below attends over the whole preallocated cache instead (or, for the server's shared cache,
over its first `step_span` slots) — slots not yet written are invalid in `cache.valid` and masked
out — and writes the new key/value at a slot index held in a tensor. Every step then has the
same shapes: `torch.compile` traces it once per (batch, cache size or span, stage layout), and on
CUDA `mode="reduce-overhead"` replays it as a CUDA graph.

In compiled mode the vision tower and projector are compiled too (`compile_encoder`), once per
number of images (or tiles) in a batch, with and without the class-token attention that some
methods before the LLM read.

The fixed-shape *prefill* pads the prompt on the right to a multiple of PREFILL_BUCKET tokens
(padding is invalid in the cache, and under causal attention no real token sees it), so that
prompts of any length share one compiled prefill per bucket instead of recompiling for every
visual-token count; without padding inside the batch it keeps plain causal attention (the flash
kernel). A reduction that cuts inside the language model (FastV, PyramidDrop, DART, ...) splits
it into stages: the layers between two cuts run compiled on the sequence padded to its bucket,
each cut layer runs eagerly (it hands the method its attention or keys) and the method's
compaction, whose output length depends on the data, runs eagerly between them.

Decode modes (`fastllava.load(..., decode=...)`, `--decode`):
  eager     the plain step (default; any cache layout).
  static    the fixed-shape prefill and step, not compiled: same tokens, for checking and debugging.
  compiled  both through torch.compile (CUDA graphs on CUDA). The first run of a new shape pays
            the compilation; cache sizes are rounded up to CACHE_BUCKET slots so that prompts of
            different lengths share a compiled step.
Quantized KV caches (KIVI, VidKV) always prefill and decode eagerly: their writes pack codes in Python.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError
from .kvcache import StaticKVCache
from .models.language import attention_mask, with_key_bias
from .models.llava import LlavaModel
from .reduction.runtime import Reduction

DECODE_MODES = ("eager", "static", "compiled")
CACHE_BUCKET = 128  # compiled decoding rounds the cache size up to a multiple of this
PREFILL_BUCKET = 64  # the fixed-shape prefill pads prompts to a multiple of this
RECOMPILE_LIMIT = 64  # shapes torch.compile may specialise each function for (its default: 8)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token [B], positions [B, 1]) -> logits [B, V]


def check_decode_mode(mode: str | None) -> str:
    mode = mode or "eager"
    if mode not in DECODE_MODES:
        raise UserError(f"unknown decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
    return mode


def cache_size(model: LlavaModel, needed: int) -> int:
    """Slots to allocate for `needed`: rounded up to CACHE_BUCKET when decoding is compiled."""
    return needed if model.decode_mode != "compiled" else _round_up(needed, CACHE_BUCKET)


def new_cache(model: LlavaModel, batch: int, needed: int) -> StaticKVCache:
    """A cache of `batch` rows with room for `needed` slots (see cache_size).

    Compiled decoding reuses one full-precision cache per (batch, size) (see lasting_cache), so
    that the CUDA graph recorded for that shape replays on the same buffers from one generation
    to the next. One generation at a time per model."""
    size = cache_size(model, needed)
    if model.decode_mode != "compiled" or model.kv_cache is not None:
        return model.new_cache(batch, size)
    cache = model._compiled_caches.get((batch, size))
    if cache is None:
        cache = model._compiled_caches[(batch, size)] = lasting_cache(model, batch, size)
    cache.clear()
    return cache


def lasting_cache(model: LlavaModel, batch: int, size: int) -> StaticKVCache:
    """A cache of `batch` rows and `size` slots to be used for many steps (or generations): in
    compiled mode its buffers are marked as keeping their addresses, so that CUDA graphs replay
    on them instead of being recorded again (or skipped, as graphs are for inputs that the step
    mutates unless their addresses are static)."""
    cache = model.new_cache(batch, size)
    if model.decode_mode == "compiled" and type(cache) is StaticKVCache:
        for buffer in (*cache.k, *cache.v, cache.valid):
            torch._dynamo.mark_static_address(buffer)
    return cache


def step_span(needed: int, size: int) -> int:
    """The cache slots a fixed-shape step attends to when `needed` of the `size` slots may hold
    keys: CACHE_BUCKET times a power of two, at most `size` (a few compiled shapes for a cache
    that is filled step by step, as the server's is)."""
    span = CACHE_BUCKET
    while span < needed:
        span *= 2
    return min(span, size)


def fixed_prefill_applies(model: LlavaModel) -> bool:
    """Whether `prefill` below runs the prompt (not the eager forward): a fixed-shape mode, a
    full-precision cache and no sliding window."""
    return model.decode_mode != "eager" and model.kv_cache is None and model.cfg.text.sliding_window is None


def prompt_slots(model: LlavaModel, tokens: int) -> int:
    """Cache slots a prompt of `tokens` tokens fills: rounded up to PREFILL_BUCKET when the
    fixed-shape prefill runs it."""
    return _round_up(tokens, PREFILL_BUCKET) if fixed_prefill_applies(model) else tokens


def prefill(model: LlavaModel, cache: StaticKVCache, embeds: torch.Tensor, positions: torch.Tensor,
            valid: torch.Tensor, reduction: Reduction | None = None) -> torch.Tensor:
    """The fixed-shape prefill (where fixed_prefill_applies) of embeds [B, T, D] at positions
    [B, T] with real tokens valid [B, T] (left-padded) into an empty `cache` -> logits at the last
    token [B, V].

    Each stage (the layers between two cuts of a reduction inside the language model; all of
    them without one) runs through `static_layers` on its sequence padded on the right to a
    multiple of PREFILL_BUCKET (the padding is invalid in the cache, and under causal attention no
    real token sees it). A cut layer runs eagerly on the unpadded sequence, as it hands the method
    its attention or keys, and so does the method's compaction, whose output length depends on
    the data. A reduction before the language model may bring its merged tokens' attention bias
    (`reduction.key_bias`, proportional attention)."""
    pruner = reduction if reduction is not None and reduction.cuts else None
    bias = None if reduction is None else reduction.key_bias  # [B, T]
    firsts = [0] + ([c + 1 for c in pruner.cuts] if pruner is not None else [])  # each stage's first layer
    for first in firsts:
        cache.split(first)
    fn = _compiled(model, static_layers) if model.decode_mode == "compiled" else static_layers
    lm, x = model.language_model, embeds
    _new_graph_step(model)
    for first, nxt in zip(firsts, firsts[1:] + [None]):
        t = x.shape[1]
        pad = _round_up(t, PREFILL_BUCKET) - t
        causal = bias is None and bool(valid.all())  # no padding, no bias: plain causal attention (flash)
        cache.reserve(first, _pad_right(valid, pad))  # marks the real slots valid
        if bias is not None:
            cache.set_bias(first, 0, bias)
        padded = _pad_right(x, pad), _pad_right(positions, pad)  # [B, T + pad, D], [B, T + pad]
        if nxt is None:
            return fn(model, cache, *padded, first, len(lm.layers), causal, True)
        cut = nxt - 1
        if cut > first:
            x = _graph_output(model, fn(model, cache, *padded, first, cut, causal, False)[:, :t])
        cos, sin = lm.rotary(positions, x.dtype)
        mask = None if causal else _prefill_mask(cache, first, t, x.dtype)
        x, probs, keys = lm.layers[cut].forward_before_cut(x, cos, sin, mask, cache, cut, 0, pruner.attention)
        x, positions, valid = pruner(cut, x, probs, keys, valid, positions)  # [B, T', D], [B, T'], [B, T']
        bias = pruner.key_bias


def static_layers(model: LlavaModel, cache: StaticKVCache, x: torch.Tensor, positions: torch.Tensor, first: int,
                  stop: int, causal: bool, head: bool) -> torch.Tensor:
    """x [B, T, D] at positions [B, T] through layers first..stop-1 (of the cache stage starting
    at `first`), into its slots 0..T (already reserved; invalid ones masked, or none when `causal`)
    -> hidden states [B, T, D], or with `head` the logits at each row's last valid slot [B, V]."""
    lm = model.language_model
    t = x.shape[1]
    cos, sin = lm.rotary(positions, x.dtype)
    mask = None if causal else _prefill_mask(cache, first, t, x.dtype)
    for i in range(first, stop):
        x = lm.layers[i](x, cos, sin, mask, cache, i, 0)
    if not head:
        return x
    slots = torch.arange(t, device=x.device)
    last = torch.where(cache.valid[first][:, :t], slots, -1).amax(1)  # [B] (found on the device: no host wait)
    x = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[2]))  # [B, 1, D]
    return model.lm_head(lm.norm(x))[:, -1]


def _prefill_mask(cache: StaticKVCache, first: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """The prefill's attention mask [B, 1, T, T] over slots 0..T of the stage starting at `first`:
    causal over its valid slots, additive with the keys' bias where tokens were merged."""
    mask = attention_mask(cache.valid[first][:, :t], 0, t, t, None, cache.valid.device)  # [B, 1, T, T]
    bias = cache.key_bias(first, t)  # merged tokens: proportional attention
    return mask if bias is None else with_key_bias(mask, bias, dtype)


def _pad_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] with n zeros (False) after each row -> [B, T + n, ...]."""
    return torch.cat([x, x.new_zeros(x.shape[0], n, *x.shape[2:])], dim=1) if n else x


def decode_step(model: LlavaModel, cache: StaticKVCache, span: int | None = None) -> Step:
    """The function that runs one decode step of `model` into `cache` (after its prefill). The
    fixed-shape step attends to the first `span` slots (default: all); the slots a step writes
    must lie within them."""
    mode = model.decode_mode
    if mode == "eager" or type(cache) is not StaticKVCache or model.cfg.text.sliding_window is not None:
        return lambda token, positions: model(model.language_model.embed_tokens(token[:, None]), positions,
                                              None, cache)[:, -1]
    fn = _compiled(model, static_step) if mode == "compiled" else static_step
    firsts = tuple(cache.stages)
    stage_of = tuple(sum(f <= i for f in firsts) - 1 for i in range(len(cache.lengths)))  # layer -> stage
    span = cache.max_len if span is None else span
    ones = torch.ones(cache.valid.shape[1], 1, dtype=torch.bool, device=cache.valid.device)  # [B, 1]
    slot, expected = None, None  # the slots on the device [stages]; what they hold next step

    def step(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        nonlocal slot, expected
        slots = [cache.reserve(first, ones)[0] for first in firsts]  # marks the new slot valid
        if max(slots) >= span:
            raise RuntimeError(f"decode step writes slot {max(slots)} beyond the {span} slots it attends to")
        if slots == expected:
            slot.add_(1)  # on the device: no host-to-device copy, which would wait for the queue
        else:
            slot = torch.tensor(slots, dtype=torch.long, device=token.device)
        expected = [s + 1 for s in slots]
        _new_graph_step(model)
        return fn(model, cache, token, positions, slot, firsts, stage_of, span)

    return step


def static_step(model: LlavaModel, cache: StaticKVCache, token: torch.Tensor, positions: torch.Tensor,
                slot: torch.Tensor, firsts: tuple[int, ...], stage_of: tuple[int, ...], span: int) -> torch.Tensor:
    """token [B], positions [B, 1], slot [stages] (the slot each stage writes, already reserved),
    firsts: each stage's first layer, stage_of: each layer's stage -> logits [B, V]. Attends over
    the first `span` cache slots; `cache.valid` masks the unwritten ones."""
    lm = model.language_model
    x = lm.embed_tokens(token[:, None])  # [B, 1, D]
    cos, sin = lm.rotary(positions, x.dtype)
    masks = [cache.valid[first][:, None, None, :span] for first in firsts]  # per stage [B, 1, 1, span]
    if cache.bias is not None:  # merged visual tokens: proportional attention
        masks = [with_key_bias(mask, cache.key_bias(first, span), x.dtype) for mask, first in zip(masks, firsts)]
    for i, layer in enumerate(lm.layers):
        stage = stage_of[i]
        x = layer(x, cos, sin, masks[stage], cache, i, slot[stage:stage + 1])
    return model.lm_head(lm.norm(x))[:, -1]


def _compiled(model: LlavaModel, fn):
    """`fn` (static_layers or static_step) through torch.compile, made once per model; each
    shape it meets is compiled once (up to RECOMPILE_LIMIT shapes)."""
    compiled = model._compiled.get(fn.__name__)
    if compiled is None:
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        compiled = model._compiled[fn.__name__] = torch.compile(fn, dynamic=False, mode=mode)
    return compiled


def compile_encoder(model: LlavaModel) -> None:
    """In compiled mode, give the model compiled `encode_pixels` (vision tower + projector) and
    `encode_with_cls` (the same, plus the class token's attention and keys in some vision blocks,
    for methods before the LLM that read them), which its encode_images then uses; made once per
    model, compiled once per number of images (or tiles). With CUDA graphs their outputs are
    copied out, as the graph's own buffers are reused by the next replay."""
    if model.decode_mode != "compiled" or "encode_pixels" in model._compiled:
        return
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    for fn in (model.encode_pixels, model.encode_with_cls):
        compiled = torch.compile(fn, dynamic=False, mode=mode)

        def encode(*args, compiled=compiled) -> tuple[torch.Tensor, ...]:
            _new_graph_step(model)
            return tuple(_graph_output(model, t) for t in compiled(*args))

        model._compiled[fn.__name__] = encode


def _graph_output(model: LlavaModel, x: torch.Tensor) -> torch.Tensor:
    """A compiled call's output, copied out of the CUDA graph's memory (which its next replay reuses)
    when CUDA graphs run; as is otherwise."""
    return x.clone() if model.decode_mode == "compiled" and model.device.type == "cuda" else x


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _new_graph_step(model: LlavaModel) -> None:
    """Tell CUDA graph trees that a new call begins: the last call's outputs are not read again."""
    if model.decode_mode == "compiled" and model.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
