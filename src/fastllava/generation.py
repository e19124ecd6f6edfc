"""Prefill and decode over a static KV cache, with sampling and per-step timing.

Prompts in a batch are left-padded: every row then writes each step into the same cache slot,
positions count only real tokens, and padding is masked out of attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import UserError
from . import fastpath
from .kvcache import StaticKVCache
from .models.llava import LlavaModel
from .reduction.runtime import Reduction

MIN_TEMPERATURE = 1e-4  # lower temperatures are greedy (dividing logits by less can overflow to inf/NaN)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is None or not 0 <= self.temperature <= 100:
            raise UserError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if self.top_p is None or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy below MIN_TEMPERATURE, else temperature, top-k, top-p."""
    if p.greedy:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded mask [B, T] -> positions [B, T] counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    m = attention_mask.bool()
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise UserError("attention_mask must be left-padded for generation (padding before the prompt)")
    if not bool(m[:, -1].all()):
        raise UserError("every prompt in the batch needs at least one token")


@dataclass
class StepTimes:
    """Wall-clock marks of one generation (seconds since its start)."""

    start: float = 0.0
    vision_s: float = 0.0
    first_token_s: float = 0.0
    end_s: float = 0.0
    kv_cache_bytes: int = 0  # bytes the KV cache of this generation holds


def _to_host(token: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """A host copy of token [B] that lands asynchronously on CUDA, with the event marking it done."""
    if token.device.type != "cuda":
        return token, None
    host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
    host.copy_(token, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock marks are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The seeded generator a sampled generation draws from (None when greedy)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
    return generator


def prefill(model: LlavaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            pixel_values: torch.Tensor | None, new_tokens: int, reduction: Reduction | None = None,
            times: StepTimes | None = None,
            image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, StaticKVCache]:
    """Run a left-padded prompt batch input_ids [B, T] into a new KV cache with room for
    `new_tokens` more: vision, projector, splice and reduction (`model.prepare`), the cache told
    its prompt, one forward. Returns the logits at each row's last token [B, V], the positions
    [B, T'] (T' after any reduction before the language model) and the cache. `times`, if
    given, gets vision_s (since times.start) and kv_cache_bytes. `image_sizes` [N, 2]: the
    (height, width) of LLaVA-NeXT images, whose pixel_values are tiles."""
    device = model.device
    b = input_ids.shape[0]
    input_ids, mask = input_ids.to(device), attention_mask.to(device).bool()
    pixels = pixel_values.to(device) if pixel_values is not None else None
    fastpath.compile_encoder(model)
    embeds, positions, mask = model.prepare(input_ids, pixels, mask, positions_from_mask(mask), reduction,
                                            image_sizes)  # [B, T', D]
    if times is not None:
        sync(device)
        times.vision_s = time.perf_counter() - times.start
    slots = fastpath.prompt_slots(model, embeds.shape[1])  # a reduction before the LLM shortens it
    cache = fastpath.new_cache(model, b, slots + new_tokens)
    visual = reduction.visual if reduction is not None else (input_ids == model.cfg.image_token_index) & mask
    cache.prompt(embeds, visual, mask)
    if times is not None:
        times.kv_cache_bytes = cache.nbytes
    if fastpath.fixed_prefill_applies(model):
        logits = fastpath.prefill(model, cache, embeds, positions, mask, reduction)
    else:
        logits = model(embeds, positions, None if bool(mask.all()) else mask, cache, True, reduction)[:, -1]
    return logits, positions, cache


@torch.inference_mode()
def decode_steps(model: LlavaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None, params: SamplingParams, eos_ids: list[int],
                 finished: torch.Tensor, times: StepTimes, reduction: Reduction | None = None,
                 image_sizes: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the sampled tokens [B] (on the CPU) after each step.

    `finished` [B] (bool, CPU) is shared with the caller: rows that hit EOS are marked here, and
    the caller may mark rows it stopped itself (stop strings); generation ends when all are done.
    `reduction` applies a visual token reduction method at prefill (its trace is filled in);
    `image_sizes` goes with LLaVA-NeXT pixel_values (see prefill).

    After the first token, the next step is queued on the device before the host waits for the
    current token, so the device never idles while the host reads a token; when generation
    stops, that one step ahead is discarded.
    """
    times.start = time.perf_counter()
    logits, positions, cache = prefill(model, input_ids, attention_mask, pixel_values, params.max_new_tokens,
                                       reduction, times, image_sizes)
    next_logits = fastpath.decode_step(model, cache)
    generator = new_generator(params, model.device)
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
    sync(model.device)
    times.end_s = time.perf_counter() - times.start
