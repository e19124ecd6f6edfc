"""The Runner: how a model runs. It owns what is not the model's weights: the decode mode, the
KV-cache layout, the compiled callables and the caches kept from one generation to the next.

Decode modes (`fastllava.load(..., decode=...)`, `--decode`):
  eager     the prefill without padding, each decode step attending to the slots in use (their
            number grows by one a step). The default; any cache layout.
  static    fixed shapes: each prefill stage padded on the right to a multiple of PREFILL_BUCKET
            tokens, each step attending to the whole cache (or, in the server, to its first
            `step_span` slots) and writing at a slot held in a tensor. Same tokens as eager; for
            checking and debugging.
  compiled  the static shapes through torch.compile (CUDA graphs on CUDA), the vision tower and
            projector too: the same functions (prefill.run_stage, step.decode_step,
            LlavaModel.encode_tower), compiled once per shape. Cache sizes are rounded up to
            CACHE_BUCKET slots so that prompts of different lengths share a compiled step.
Quantized KV caches (KIVI, VidKV) always run eagerly: their writes pack codes in Python. So does a
sliding-window decoder (Mistral): its window is a mask over slot positions, and bucket padding
would put padding slots inside the window.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UserError
from ..kvcache import StaticKVCache
from ..models.llava import LlavaModel, Tower
from ..ops import positions_from_mask, round_up
from ..quant.kvcache import new_kv_cache
from ..quant.spec import KVSpec
from ..reduction.runtime import Reduction
from .encoder_cache import EncoderCache
from .prefill import prefill, prepare, run_stage
from .sampling import SamplingParams, new_generator, sample
from .step import Step, decode_step

DECODE_MODES = ("eager", "static", "compiled")
CACHE_BUCKET = 128  # compiled decoding rounds the cache size up to a multiple of this
PREFILL_BUCKET = 64  # the fixed-shape prefill pads each stage to a multiple of this
RECOMPILE_LIMIT = 64  # shapes torch.compile may specialise each function for (its default: 8)


def check_decode_mode(mode: str | None) -> str:
    mode = mode or "eager"
    if mode not in DECODE_MODES:
        raise UserError(f"unknown decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
    return mode


@dataclass
class StepTimes:
    """Wall-clock marks of one generation (seconds since its start)."""

    start: float = 0.0
    vision_s: float = 0.0
    first_token_s: float = 0.0
    end_s: float = 0.0
    kv_cache_bytes: int = 0  # bytes the KV cache of this generation holds


class Runner:
    def __init__(self, model: LlavaModel, decode: str | None = "eager", kv_cache: KVSpec | None = None):
        self.model = model
        self.decode = check_decode_mode(decode)
        self.kv_cache = kv_cache  # the cache layout; None: full precision
        self.compiled: dict = {}  # torch.compile'd run_stage, decode_step, encode_tower, made on first use
        self._caches: dict = {}  # compiled mode: reused caches by (batch, slots)
        self.calls: Counter = Counter()  # prefills and steps run: "fixed_prefill", "eager_prefill", "fixed_step", ...
        self.encoder_cache: EncoderCache | None = None  # images encoded before, kept (the server sets one)

    @property
    def fixed(self) -> bool:
        """Whether prefill and steps run with fixed shapes: static and compiled modes, with a
        full-precision cache and no sliding window (see the module's docstring)."""
        return self.decode != "eager" and self.kv_cache is None and self.model.cfg.text.sliding_window is None

    @property
    def graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs."""
        return self.decode == "compiled" and self.model.device.type == "cuda"

    # ---- caches ----

    def prompt_slots(self, tokens: int) -> int:
        """Cache slots a prompt of `tokens` tokens fills: rounded up to PREFILL_BUCKET with fixed shapes."""
        return round_up(tokens, PREFILL_BUCKET) if self.fixed else tokens

    def cache_size(self, needed: int) -> int:
        """Slots to allocate for `needed`: rounded up to CACHE_BUCKET when decoding is compiled."""
        return round_up(needed, CACHE_BUCKET) if self.decode == "compiled" else needed

    def new_cache(self, batch: int, needed: int) -> StaticKVCache:
        """A cache of `batch` rows with room for `needed` slots (see cache_size). Compiled decoding
        reuses one cache per (batch, size), so that the CUDA graph recorded for that shape replays
        on the same buffers from one generation to the next: one generation at a time per runner."""
        size = self.cache_size(needed)
        if self.decode != "compiled" or self.kv_cache is not None:
            return self._cache(batch, size)
        cache = self._caches.get((batch, size))
        if cache is None:
            cache = self._caches[(batch, size)] = self.lasting_cache(batch, size)
        cache.clear()
        return cache

    def lasting_cache(self, batch: int, size: int) -> StaticKVCache:
        """A cache of `batch` rows and `size` slots used for many steps (or generations): in compiled
        mode its buffers keep their addresses, so that CUDA graphs replay on them instead of being
        recorded again (or skipped, as graphs are for inputs that a step mutates)."""
        cache = self._cache(batch, size)
        if self.decode == "compiled" and type(cache) is StaticKVCache:
            for buffer in (*cache.k, *cache.v, cache.valid):
                torch._dynamo.mark_static_address(buffer)
        return cache

    def _cache(self, batch: int, size: int) -> StaticKVCache:
        t, m = self.model.cfg.text, self.model
        return new_kv_cache(self.kv_cache, t.num_hidden_layers, batch, t.num_key_value_heads, size, t.head_dim,
                            m.dtype, m.device)

    # ---- compiled callables ----

    def _compile(self, fn):
        """`fn` through torch.compile in compiled mode (made once per runner; each shape it meets is
        compiled once, up to RECOMPILE_LIMIT), with its outputs copied out of CUDA graph memory
        (which the next replay reuses); `fn` itself otherwise."""
        if self.decode != "compiled":
            return fn
        wrapped = self.compiled.get(fn.__name__)
        if wrapped is None:
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
            compiled = torch.compile(fn, dynamic=False, mode="reduce-overhead" if self.graphs else None)

            def wrapped(*args):
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs are not read again
                out = compiled(*args)
                return (tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()) if self.graphs else out

            self.compiled[fn.__name__] = wrapped
        return wrapped

    def tower(self) -> Tower | None:
        """The vision tower + projector: compiled in compiled mode, read through the encoder cache
        when there is one; None for the model's own."""
        tower = self._compile(self.model.encode_tower) if self.decode == "compiled" else None
        if self.encoder_cache is None:
            return tower
        return self.encoder_cache.wrap(tower or self.model.encode_tower)

    # ---- prefill and steps ----

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                new_tokens: int, reduction: Reduction | None = None, times: StepTimes | None = None,
                image_sizes: torch.Tensor | None = None, pixel_values_videos=None
                ) -> tuple[torch.Tensor, torch.Tensor, StaticKVCache]:
        """Run a left-padded prompt batch input_ids [B, T] into a new cache with room for
        `new_tokens` more -> (logits at each row's last token [B, V], positions [B, T'] (T' after a
        reduction before the language model), the cache). `times`, if given, gets vision_s (since
        times.start) and kv_cache_bytes. `image_sizes` [N, 2]: LLaVA-NeXT images' (height, width).
        `pixel_values_videos`: LLaVA-OneVision videos (see prefill.prepare)."""
        model = self.model
        device = model.device
        input_ids, valid = input_ids.to(device), attention_mask.to(device).bool()
        pixels = pixel_values.to(device) if pixel_values is not None else None
        videos = _to_device(pixel_values_videos, device)
        embeds, positions, valid = prepare(model, input_ids, pixels, valid, positions_from_mask(valid), reduction,
                                           image_sizes, self.tower(), videos)  # [B, T', D]
        if times is not None:
            sync(device)
            times.vision_s = time.perf_counter() - times.start
        cache = self.new_cache(input_ids.shape[0], self.prompt_slots(embeds.shape[1]) + new_tokens)
        visual = reduction.visual if reduction is not None else visual_tokens(model.cfg, input_ids) & valid
        cache.prompt(embeds, visual, valid)
        if times is not None:
            times.kv_cache_bytes = cache.nbytes
        bucket = PREFILL_BUCKET if self.fixed else 1
        self.calls["fixed_prefill" if self.fixed else "eager_prefill"] += 1
        logits = prefill(model, embeds, positions, valid, cache, reduction, bucket, self._compile(run_stage))
        return logits, positions, cache

    def prefill_cached(self, k: torch.Tensor, v: torch.Tensor, input_ids: torch.Tensor,
                       pixel_values: torch.Tensor | None, new_tokens: int, image_sizes: torch.Tensor | None = None,
                       pixel_values_videos=None) -> tuple[torch.Tensor, torch.Tensor, StaticKVCache]:
        """As `prefill` for one prompt input_ids [1, T] (no padding, no reduction) whose first M
        tokens' keys and values k, v [L, Hkv, M, Dh] are known (a cached prefix): only tokens M..T
        run, eagerly, attending to the prefix -> (logits [1, V], positions [1, T], the cache).
        The images (and videos) are still encoded, through the encoder cache when there is one, for
        the visual tokens past the prefix."""
        model, device = self.model, self.model.device
        input_ids = input_ids.to(device)
        valid = torch.ones_like(input_ids, dtype=torch.bool)  # [1, T]
        pixels = pixel_values.to(device) if pixel_values is not None else None
        embeds, positions, valid = prepare(model, input_ids, pixels, valid, positions_from_mask(valid), None,
                                           image_sizes, self.tower(), _to_device(pixel_values_videos, device))
        m = k.shape[2]  # embeds [1, T, D]
        cache = self._cache(1, input_ids.shape[1] + new_tokens)
        cache.reserve(0, valid[:, :m])
        for layer in range(k.shape[0]):
            cache.update(layer, 0, k[layer][None], v[layer][None], m)
        self.calls["cached_prefill"] += 1
        logits = prefill(model, embeds[:, m:], positions[:, m:], valid[:, m:], cache, start=m)
        return logits, positions, cache

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, valid: torch.Tensor,
               positions: torch.Tensor, reduction: Reduction | None = None,
               image_sizes: torch.Tensor | None = None, pixel_values_videos=None) -> torch.Tensor:
        """Logits [B, T', V] at every token, without a cache (T' after the reduction's last cut)."""
        model = self.model
        embeds, positions, valid = prepare(model, input_ids, pixel_values, valid, positions, reduction, image_sizes,
                                           None, _to_device(pixel_values_videos, model.device))
        return prefill(model, embeds, positions, valid, None, reduction, head="all")

    def step(self, cache: StaticKVCache, span: int | None = None) -> Step:
        """The function that runs one decode step into `cache` (after its prefill). Eagerly, each
        stage attends to the slots it has in use; with fixed shapes, to the first `span` slots
        (default: all), within which the slots a step writes must lie."""
        firsts = tuple(cache.stages)
        ones = torch.ones(cache.valid.shape[1], 1, dtype=torch.bool, device=cache.valid.device)  # [B, 1]
        model = self.model
        if not self.fixed:
            def eager(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                ranges = [cache.reserve(first, ones) for first in firsts]  # marks the new slot valid
                self.calls["eager_step"] += 1
                return decode_step(model, cache, token[:, None], positions, [s for s, _ in ranges],
                                   tuple(e for _, e in ranges), firsts)[:, -1]

            return eager
        fn = self._compile(decode_step)
        spans = (cache.max_len if span is None else span,) * len(firsts)
        slot, expected = None, None  # the slots on the device [stages]; what they hold next step

        def fixed(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            nonlocal slot, expected
            slots = [cache.reserve(first, ones)[0] for first in firsts]  # marks the new slot valid
            if max(slots) >= spans[0]:
                raise RuntimeError(f"decode step writes slot {max(slots)} beyond the {spans[0]} slots it attends to")
            if slots == expected:
                slot.add_(1)  # on the device: no host-to-device copy, which would wait for the queue
            else:
                slot = torch.tensor(slots, dtype=torch.long, device=token.device)
            expected = [s + 1 for s in slots]
            self.calls["fixed_step"] += 1
            return fn(model, cache, token[:, None], positions, slot, spans, firsts)[:, -1]

        return fixed


    def multi_step(self, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                   skip: frozenset = frozenset(), valid: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step for T tokens per row at once: tokens [B, T] at positions [B, T] into the
        next T slots of every stage -> logits [B, T, V]. Verifies a speculation's drafts (T = 1 + k)
        or, with layers to `skip`, runs a self-speculative draft step. `valid` [B, T] marks the real
        tokens (None: all; the others are padding no token attends to). With fixed shapes it is the
        same (compiled) decode_step as `step`, once per T, attending to the whole cache."""
        firsts = tuple(cache.stages)
        if valid is None:
            valid = torch.ones(tokens.shape, dtype=torch.bool, device=cache.valid.device)  # [B, T]
        ranges = [cache.reserve(first, valid) for first in firsts]
        self.calls[("fixed" if self.fixed else "eager") + "_multi_step"] += 1
        if not self.fixed:
            return decode_step(self.model, cache, tokens, positions, [s for s, _ in ranges],
                               tuple(e for _, e in ranges), firsts, skip)
        slots = torch.tensor([s for s, _ in ranges], dtype=torch.long, device=tokens.device)
        return self._compile(decode_step)(self.model, cache, tokens, positions, slots,
                                          (cache.max_len,) * len(firsts), firsts, skip)


def visual_tokens(cfg, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> [B, T] bool: image and video tokens (what a KV-cache layout treats as visual)."""
    visual = input_ids == cfg.image_token_index
    if cfg.video_token_index is not None:
        visual |= input_ids == cfg.video_token_index
    return visual


def step_span(needed: int, size: int) -> int:
    """The cache slots a fixed-shape step attends to when `needed` of the `size` slots may hold
    keys: CACHE_BUCKET times a power of two, at most `size` (a few compiled shapes for a cache
    that is filled step by step, as the server's is)."""
    span = CACHE_BUCKET
    while span < needed:
        span *= 2
    return min(span, size)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    m = attention_mask.bool()
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise UserError("attention_mask must be left-padded for generation (padding before the prompt)")
    if not bool(m[:, -1].all()):
        raise UserError("every prompt in the batch needs at least one token")


def _to_device(videos, device: torch.device):
    """pixel_values_videos (a tensor, a list of tensors, or None) on `device`."""
    if videos is None or isinstance(videos, torch.Tensor):
        return None if videos is None else videos.to(device)
    return [v.to(device) for v in videos]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock marks are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host(token: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """A host copy of token [B] that lands asynchronously on CUDA, with the event marking it done."""
    if token.device.type != "cuda":
        return token, None
    host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
    host.copy_(token, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@torch.inference_mode()
def decode_steps(runner: Runner, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None, params: SamplingParams, eos_ids: list[int],
                 finished: torch.Tensor, times: StepTimes, reduction: Reduction | None = None,
                 image_sizes: torch.Tensor | None = None, pixel_values_videos=None) -> Iterator[torch.Tensor]:
    """Yield the sampled tokens [B] (on the CPU) after each step.

    `finished` [B] (bool, CPU) is shared with the caller: rows that hit EOS are marked here, and
    the caller may mark rows it stopped itself (stop strings); generation ends when all are done.
    `reduction` applies a visual token reduction method at prefill (its trace is filled in);
    `image_sizes` goes with LLaVA-NeXT pixel_values, `pixel_values_videos` are LLaVA-OneVision videos.

    After the first token, the next step is queued on the device before the host waits for the
    current token, so the device never idles while the host reads a token; when generation
    stops, that one step ahead is discarded.
    """
    times.start = time.perf_counter()
    logits, positions, cache = runner.prefill(input_ids, attention_mask, pixel_values, params.max_new_tokens,
                                              reduction, times, image_sizes, pixel_values_videos)
    next_logits = runner.step(cache)
    generator = new_generator(params, runner.model.device)
    eos = torch.tensor(eos_ids or [-1], device="cpu")
    pos = positions[:, -1:]  # [B, 1]
    ahead = []  # queued steps: (token [B] on the device, its host copy, copy-done event or None)

    def queue_after(token: torch.Tensor) -> None:
        nonlocal pos
        pos = pos + 1
        nxt = sample(next_logits(token, pos), params, generator)  # [B]
        ahead.append((nxt, *_to_host(nxt)))

    token = sample(logits, params, generator)  # [B]
    host = token.cpu()
    times.first_token_s = time.perf_counter() - times.start
    done = 0
    while True:
        finished |= torch.isin(host, eos)
        yield host
        done += 1
        if bool(finished.all()) or done == params.max_new_tokens:
            break
        if not ahead:
            queue_after(token)
        token, host, ready = ahead.pop(0)
        if done + 1 < params.max_new_tokens:
            queue_after(token)  # before waiting for `host`
        if ready is not None:
            ready.synchronize()
    sync(runner.model.device)
    times.end_s = time.perf_counter() - times.start
