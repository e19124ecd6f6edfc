"""Llama / Mistral decoder: RMSNorm, rotary positions, grouped-query attention, SiLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..kvcache import StaticKVCache
from .fused import FusedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x²) + eps), computed in float32 (one fused op), back in x's dtype, times the weight."""
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding with optional linear or dynamic-NTK scaling."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dim, self.rope, self.max_pos = cfg.head_dim, cfg.rope, cfg.max_position_embeddings
        # A plain attribute, not a buffer: it stays float32 when the model is cast to bf16.
        self.inv_freq = self._inv_freq(cfg.rope.theta)  # [Dh/2], float32

    def _inv_freq(self, base: float) -> torch.Tensor:
        inv = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim))
        return inv / self.rope.factor if self.rope.kind == "linear" else inv

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, Dh]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        inv_freq = self.inv_freq
        if self.rope.kind == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_pos:
                f = self.rope.factor
                base = self.rope.theta * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
                inv_freq = self._inv_freq(base).to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [B, T, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh]; cos, sin [B, T, Dh]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = FusedLinear(cfg.hidden_size, [q_dim, kv_dim, kv_dim], bias=cfg.attention_bias)  # q, k, v
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: StaticKVCache | None, layer: int, start: int, weights: bool = False, queries=None):
        """x [B, T, D] -> (out [B, T, D], probs [B, H, T, S] or None, keys [B, Hkv, S, Dh]). A mask
        [B, 1, T, S] narrower than the cache's keys attends to its first S slots.
        `weights` computes the attention probabilities explicitly (for a reduction hook at this
        layer); otherwise attention goes through SDPA and probs is None. `queries` (rows [N],
        positions [N]; without `mask`, the last position only) gives probs [N, H, S] of those
        queries only, beside SDPA."""
        b, t, _ = x.shape
        q, k, v = self.qkv.forward_split(x)
        q = apply_rotary(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        k = apply_rotary(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, Hkv, T, Dh]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)  # [B, Hkv, S, Dh]
            if mask is not None and mask.shape[-1] < k.shape[2]:  # a fixed-shape step over the first slots only
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        probs = None
        if weights:
            probs = _attention_probs(q, k, mask)  # [B, H, T, S]
            rep = self.heads // self.kv_heads
            out = probs.to(v.dtype) @ v.repeat_interleave(rep, dim=1)
        else:
            causal = mask is None and t > 1
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
            )  # [B, H, T, Dh]
            if queries is not None:  # without a mask (causal over the whole range): the last query only
                rows, pos = queries
                qmask = None if mask is None else mask[rows, :, pos, None]
                probs = _attention_probs(q[rows, :, pos, None], k[rows], qmask)[:, :, 0]  # [N, H, S]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)), probs, k


def _attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention probabilities [B, H, T, S] (float32) of queries q [B, H, T, Dh] over keys
    k [B, Hkv, S, Dh]; mask [B, 1, T, S] (True = attend, or additive floats) or None for causal
    (queries are the last T)."""
    t, s = q.shape[2], k.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, T, S]
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask.dtype != torch.bool:  # additive (with key biases)
        return (scores + mask.float()).softmax(-1)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up = FusedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias)  # gate, up
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.forward_split(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        return self.forward_with_attention(x, cos, sin, mask, cache, layer, start, False)[0]

    def forward_with_attention(self, x, cos, sin, mask, cache, layer, start, weights: bool, queries=None):
        """-> (x [B, T, D], probs [B, H, T, S] or [N, H, S] or None, keys [B, Hkv, S, Dh]) (see Attention)."""
        h, probs, keys = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start, weights, queries)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs, keys

    def forward_before_cut(self, x, cos, sin, mask, cache, layer, start, attention: str | None):
        """This layer ahead of a reduction's cut -> (x [B, T, D], probs, keys [B, Hkv, S, Dh]) with
        the attention the method reads (Reduction.attention): None; "all", every query's [B, H, T, S]
        (computed explicitly); or "last", the last query's [B, H, 1, S] (beside fused attention)."""
        if attention != "last":
            return self.forward_with_attention(x, cos, sin, mask, cache, layer, start, attention == "all")
        rows = torch.arange(x.shape[0], device=x.device)
        x, probs, keys = self.forward_with_attention(x, cos, sin, mask, cache, layer, start, False,
                                                     (rows, torch.full_like(rows, x.shape[1] - 1)))
        return x, probs[:, :, None], keys


class LanguageModel(nn.Module):
    """Decoder stack without the output head: embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None,
                cache: StaticKVCache | None = None, pruner=None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] input embeddings; positions [B, T]; key_valid [B, T] marks real (non-pad)
        tokens of this step, None when all are real. With a cache, the step is appended to it.

        `pruner` (a reduction.Reduction, prefill only) drops visual tokens after its cut layers:
        later layers run on the compacted sequence (kept tokens keep their positions) and, with a
        cache, get a compact cache of their own. The result then has the compacted length. Where
        it merges tokens with proportional attention (`pruner.key_bias`), later layers add that
        bias to the merged keys' attention logits; the cache keeps it for the decode steps.
        `key_bias` [B, T] is such a bias from the start (tokens merged before the language model)."""
        b, t, _ = x.shape
        valid = key_valid if key_valid is not None else x.new_ones(b, t, dtype=torch.bool)  # [B, T]
        bias = key_bias  # [B, T] additive attention logit of each key of this step, from merged tokens
        stages = [0]
        if pruner is not None:
            stages += [c + 1 for c in pruner.cuts]
            if cache is not None:
                if cache.length:
                    raise RuntimeError("visual token reduction runs at prefill, on an empty cache")
                for first in stages:
                    cache.split(first)
        elif cache is not None:
            stages = cache.stages
        for i, layer in enumerate(self.layers):
            if i in stages:  # a new slot layout: reserve it and build its mask and rotary tables
                mask, start = self._stage(cache, i, valid, x.dtype, bias)
                cos, sin = self.rotary(positions, x.dtype)
            if pruner is not None and i in pruner.cuts:
                x, probs, keys = layer.forward_before_cut(x, cos, sin, mask, cache, i, start, pruner.attention)
                x, positions, valid = pruner(i, x, probs, keys, valid, positions)
                bias = pruner.key_bias
            else:
                x = layer(x, cos, sin, mask, cache, i, start)
        return self.norm(x)

    def _stage(self, cache: StaticKVCache | None, first: int, valid: torch.Tensor, dtype: torch.dtype,
               bias: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """(attention mask, first slot) for the layers of the stage starting at layer `first`, whose
        step's keys get the additive attention bias [B, T] (None: none; a cache also brings the
        bias of the keys it holds)."""
        t, device = valid.shape[1], valid.device
        if cache is None:
            start, end, mask = 0, t, self._mask(valid, 0, t, t, device)
        else:
            start, end = cache.reserve(first, valid)
            if bias is not None:
                cache.set_bias(first, start, bias)
            bias = cache.key_bias(first, end)
            mask = self._mask(cache.valid[first, :, :end], start, t, end, device)
        if bias is None:
            return mask, start
        if mask is None:
            mask = attention_mask(None, start, t, end, None, device)
        return with_key_bias(mask, bias, dtype), start

    def _mask(self, key_valid: torch.Tensor | None, start: int, t: int, end: int,
              device: torch.device) -> torch.Tensor | None:
        """Boolean attention mask [B, 1, T, S] (True = attend), or None when plain causal
        attention over the whole range is exact."""
        window = self.cfg.sliding_window
        needs_window = window is not None and end > window
        if t == 1 and key_valid is not None and not needs_window:
            return key_valid[:, None, None, :]  # one query at the newest slot (no host wait to check padding)
        if (key_valid is None or bool(key_valid.all())) and not needs_window and start == 0:
            return None
        return attention_mask(key_valid, start, t, end, window if needs_window else None, device)


def attention_mask(key_valid: torch.Tensor | None, start: int, t: int, end: int, window: int | None,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] (True = attend; B = 1 without key_valid) for queries at slots
    start..start+T over keys at slots 0..end: causal, within `window` slots if given, and only
    keys that key_valid [B, S] marks. A query still sees itself, so attention stays finite for
    padding."""
    q_slot = torch.arange(start, start + t, device=device)[:, None]  # [T, 1]
    k_slot = torch.arange(end, device=device)[None, :]  # [1, S]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    mask = allowed[None] if key_valid is None else allowed[None] & key_valid[:, None, :]  # [B, T, S]
    return (mask | (k_slot == q_slot)[None])[:, None]


def with_key_bias(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask [B or 1, 1, T, S] (True = attend) and bias [B, S] added to every query's
    logit for each key -> additive mask [B, 1, T, S] of `dtype` (-inf where not attended)."""
    return torch.where(mask, bias[:, None, None, :].to(dtype), float("-inf"))
