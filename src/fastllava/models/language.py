"""Llama / Mistral / Qwen2 decoder: RMSNorm, rotary positions, grouped-query attention, SiLU MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .fused import FusedLinear

if TYPE_CHECKING:
    from ..kvcache import StaticKVCache

# Attention probabilities a layer hands back beside its output (Attention.forward): None, "all",
# "last", or (rows [N], positions [N]) of the queries wanted.
Read = Union[None, str, tuple]


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
        # q, k, v; Qwen2 (qkv_bias) has biases on these three only
        self.qkv = FusedLinear(cfg.hidden_size, [q_dim, kv_dim, kv_dim], bias=cfg.attention_bias or cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: "StaticKVCache | None", layer: int, slot: int | torch.Tensor, span: int, read: Read = None):
        """x [B, T, D] -> (out [B, T, D], probs or None, keys [B, Hkv, S, Dh]).

        With a cache, this step's keys and values go to slots slot..slot+T of `layer` and
        attention reads its first `span` slots (S = span); without one, S = T. `mask` [B, 1, T, S]
        (boolean, True = attend, or additive floats) or None for plain causal attention over the
        T keys. `read` asks for attention probabilities beside the output: "all" every query's
        [B, H, T, S] (attention then computed explicitly), "last" the last query's [B, H, 1, S],
        or (rows [N], positions [N]) those queries' [N, H, S] (both beside fused attention)."""
        b, t, _ = x.shape
        q, k, v = self.qkv.forward_split(x)
        q = apply_rotary(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        k = apply_rotary(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, Hkv, T, Dh]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, slot, k, v, span)  # [B, Hkv, S, Dh]
        probs = None
        if read == "all":
            probs = _attention_probs(q, k, mask)  # [B, H, T, S]
            out = probs.to(v.dtype) @ v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=self.kv_heads != self.heads
            )  # [B, H, T, Dh]
        if read == "last":
            rows = torch.arange(b, device=x.device)
            probs = self._query_probs(q, k, mask, rows, torch.full_like(rows, t - 1))[:, :, None]  # [B, H, 1, S]
        elif isinstance(read, tuple):
            probs = self._query_probs(q, k, mask, *read)  # [N, H, S]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)), probs, k

    @staticmethod
    def _query_probs(q, k, mask, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [N, H, S] of the queries at (rows [N], positions [N])."""
        qmask = None if mask is None else mask[rows, :, pos, None]
        return _attention_probs(q[rows, :, pos, None], k[rows], qmask)[:, :, 0]


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

    def forward(self, x, cos, sin, mask, cache, layer: int, slot, span: int, read: Read = None):
        """-> (x [B, T, D], probs or None, keys [B, Hkv, S, Dh]) (see Attention)."""
        h, probs, keys = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slot, span, read)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs, keys


class LanguageModel(nn.Module):
    """Decoder stack without the output head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
            cache: "StaticKVCache | None", slot: int | torch.Tensor, span: int, layers: Sequence[int],
            read: Read = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The layer loop: x [B, T, D] through `layers` (indices, in order), all with the same mask,
        cache slots and span (see Attention) -> (x [B, T, D], then the probs that `read` asks for
        and the keys [B, Hkv, S, Dh] of the last layer run)."""
        probs = keys = None
        for n, i in enumerate(layers):
            x, probs, keys = self.layers[i](x, cos, sin, mask, cache, i, slot, span,
                                            read if n == len(layers) - 1 else None)
        return x, probs, keys
