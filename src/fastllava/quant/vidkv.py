"""VidKV: 1.x-bit KV-cache quantization for (video) LLMs.

Tao, You, Sui, Qin, Wang: "Plug-and-Play 1.x-Bit KV Cache Quantization for Video Large Language
Models", arXiv:2503.16257 (2025).

- Keys, mixed precision by channel: within each group of `group` tokens, the channels with the
  widest range (max - min over the group's real tokens) -- a fraction `high` of them, 0.5 giving
  the paper's 1.5-bit keys -- get 2-bit per-channel min-max quantization; the other ("normal")
  channels are taken to the frequency domain with an FFT along the channel axis and quantized to
  1 bit (sign times the group's mean magnitude, per frequency component), then brought back with
  the inverse FFT.
- Values at 1.58 bits, per channel (the paper's finding: per-channel beats KIVI's per-token for
  visual tokens): ternary {-1, 0, +1} times the channel group's mean magnitude (absmean).
- Optional salient-token preservation (`salient=` fraction): the visual tokens most related to
  the text (mean dot product of the LLM's input embeddings with the row's text tokens, as in the
  authors' code) also keep 2-bit values, read instead of their ternary ones.
- Recent tokens stay in full precision as in KIVI (residual window, default 128).

Where the authors' public code (github.com/KD-TAO/VidKV) disagrees with the paper's quantizers
and its bit budget (1.5-bit keys, 1.58-bit values) we follow the paper: (1) the code dequantizes 1.58-bit values to the bare codes {-1, 0, 1}, dropping the scale
it computed; we reconstruct alpha * code. (2) The code stores 1-bit codes as {0, 1} and
dequantizes them to {0, alpha}; we reconstruct sign quantization, {-alpha, +alpha}. (3) The code
quantizes real and imaginary parts of a complex FFT, i.e. 2 numbers per normal channel, so its
"1-bit" channels cost 2 bits; we use the real FFT, whose D real degrees of freedom cost exactly
1 bit per channel as the paper counts. (4) The code stores ternary codes in 2 bits; we pack five
per byte (1.6 bits). Our own choices, where neither fixes one: channels are ranked per sequence,
head and token group (the code ranks them once over the whole batch and all heads); padding is
left out of every range and scale; the FFT is orthonormal (the sign code does not depend on it).
"""

from __future__ import annotations

import torch

from . import kivi
from .packing import pack_bits, pack_trits, packed_len, packed_trits_len, unpack_bits, unpack_trits
from .quantizers import (absmean, minmax_decode, minmax_encode, minmax_params, sign_decode, sign_encode,
                         ternary_decode, ternary_encode)
from .store import PackedStore, Part


def rfft_real(x: torch.Tensor) -> torch.Tensor:
    """Real FFT along the last dim as n real numbers: the n//2 + 1 real parts, then the imaginary
    parts that are not identically zero (all but the first and, for even n, the last)."""
    n = x.shape[-1]
    f = torch.fft.rfft(x.float(), dim=-1, norm="ortho")
    return torch.cat([f.real, f.imag[..., 1:(n + 1) // 2]], dim=-1)


def irfft_real(y: torch.Tensor) -> torch.Tensor:
    """Inverse of rfft_real."""
    n = y.shape[-1]
    re = y[..., :n // 2 + 1]
    im = torch.zeros_like(re)
    im[..., 1:(n + 1) // 2] = y[..., n // 2 + 1:]
    return torch.fft.irfft(torch.complex(re, im), n=n, dim=-1, norm="ortho")


def _split_channels(high_mask: torch.Tensor, n_low: int) -> tuple[torch.Tensor, torch.Tensor]:
    """high_mask [..., D] bool -> (low channel ids, high channel ids), each ascending."""
    order = torch.argsort(high_mask.to(torch.int8), dim=-1, stable=True)
    return order[..., :n_low], order[..., n_low:]


def _gather(xg: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """xg [B, H, g, G, D], idx [B, H, g, k] -> [B, H, g, G, k]."""
    return xg.gather(-1, idx[:, :, :, None, :].expand(*xg.shape[:-1], idx.shape[-1]))


class KeyCodec:
    """Mixed precision by channel over groups of `group` tokens: 2 bits for the widest `high`
    fraction of channels, FFT + 1 bit for the rest."""

    def __init__(self, group: int, high: float, dim: int):
        self.group = group
        self.n_high = min(max(round(high * dim), 1), dim - 1)  # both kinds present
        self.n_low = dim - self.n_high

    def parts(self, dim: int) -> dict[str, Part]:
        g, hi, lo = self.group, self.n_high, self.n_low
        return {
            "high_mask": Part((packed_len(dim, 1),), torch.uint8, g),
            "high_codes": Part((packed_len(hi, 2),), torch.uint8, 1),
            "high_scale": Part((hi,), None, g), "high_min": Part((hi,), None, g),
            "low_codes": Part((packed_len(lo, 1),), torch.uint8, 1),
            "low_alpha": Part((lo,), None, g),
        }

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = x.shape
        xg = x.float().view(b, h, n // self.group, self.group, d)  # [B, H, g, G, D]
        vg = valid.view(b, 1, n // self.group, self.group, 1)
        scale, mn = minmax_params(xg, 3, 2, vg)  # [B, H, g, 1, D]; range = 3 * scale
        top = scale[:, :, :, 0].topk(self.n_high, dim=-1).indices  # [B, H, g, hi]
        high_mask = torch.zeros(b, h, n // self.group, d, dtype=torch.bool, device=x.device)
        high_mask.scatter_(-1, top, True)
        low_idx, high_idx = _split_channels(high_mask, self.n_low)
        hs, hm = scale[:, :, :, 0].gather(-1, high_idx), mn[:, :, :, 0].gather(-1, high_idx)  # [B, H, g, hi]
        high = minmax_encode(_gather(xg, high_idx), hs[:, :, :, None], hm[:, :, :, None], 2)
        freq = rfft_real(_gather(xg, low_idx))  # [B, H, g, G, lo]
        alpha = absmean(freq, 3, vg)  # [B, H, g, 1, lo]
        return {
            "high_mask": pack_bits(high_mask, 1),
            "high_codes": pack_bits(high.view(b, h, n, self.n_high), 2), "high_scale": hs, "high_min": hm,
            "low_codes": pack_bits(sign_encode(freq).view(b, h, n, self.n_low), 1), "low_alpha": alpha[:, :, :, 0],
        }

    def decode(self, parts: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        b, h, g, _ = parts["high_scale"].shape
        d, gs = self.n_high + self.n_low, self.group
        high_mask = unpack_bits(parts["high_mask"], 1, d).bool()  # [B, H, g, D]
        low_idx, high_idx = _split_channels(high_mask, self.n_low)
        high_codes = unpack_bits(parts["high_codes"], 2, self.n_high).view(b, h, g, gs, self.n_high)
        high = minmax_decode(high_codes, parts["high_scale"][:, :, :, None], parts["high_min"][:, :, :, None])
        low_codes = unpack_bits(parts["low_codes"], 1, self.n_low).view(b, h, g, gs, self.n_low)
        low = irfft_real(sign_decode(low_codes, parts["low_alpha"][:, :, :, None]))
        out = torch.empty(b, h, g, gs, d, device=high.device)
        out.scatter_(-1, high_idx[:, :, :, None, :].expand_as(high), high)
        out.scatter_(-1, low_idx[:, :, :, None, :].expand_as(low), low)
        return out.view(b, h, n, d)


class ValueCodec:
    """Ternary (1.58-bit) per channel over groups of `group` tokens, absmean scale."""

    def __init__(self, group: int):
        self.group = group

    def parts(self, dim: int) -> dict[str, Part]:
        return {"codes": Part((packed_trits_len(dim),), torch.uint8, 1), "alpha": Part((dim,), None, self.group)}

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = x.shape
        xg = x.float().view(b, h, n // self.group, self.group, d)
        alpha = absmean(xg, 3, valid.view(b, 1, n // self.group, self.group, 1))  # [B, H, g, 1, D]
        codes = ternary_encode(xg, alpha).view(b, h, n, d)
        return {"codes": pack_trits(codes), "alpha": alpha[:, :, :, 0]}

    def decode(self, parts: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        b, h, g, d = parts["alpha"].shape
        codes = unpack_trits(parts["codes"], d).view(b, h, g, self.group, d)
        return ternary_decode(codes, parts["alpha"][:, :, :, None]).view(b, h, n, d)


def salient_slots(embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """VidKV's salient visual tokens of a prompt: embeds [B, T, D] (the language model's inputs),
    visual [B, T] marks visual tokens, valid [B, T] real ones. A visual token's score is its mean
    dot product with the row's text tokens; each row keeps round(ratio * its visual tokens) of the
    best. Returns slots [B, k], ascending, -1 where a row has fewer than the longest."""
    text = (valid & ~visual).float()  # [B, T]
    text_mean = (embeds.float() * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)  # [B, D]
    score = (embeds.float() @ text_mean[:, :, None])[..., 0].masked_fill(~visual, float("-inf"))  # [B, T]
    counts = (visual.sum(1).float() * ratio).round().long()  # [B]
    k = int(counts.max()) if counts.numel() else 0
    top = score.topk(k, dim=1).indices  # [B, k]
    top = top.masked_fill(torch.arange(k, device=top.device)[None] >= counts[:, None], embeds.shape[1])
    top = top.sort(dim=1).values
    return top.masked_fill(top == embeds.shape[1], -1)


class SalientValues:
    """The values of a prompt's salient tokens, also kept at 2 bits (min-max per channel over
    groups of `group` salient tokens, as the authors' code does) and read in place of their
    ternary codes once those are in the quantized store."""

    def __init__(self, slots: torch.Tensor, group: int, heads: int, dim: int, dtype: torch.dtype):
        self.slots = slots  # [B, k], -1: none
        b, k = slots.shape
        self.codec = kivi.KeyCodec(2, group)
        self.store = PackedStore(self.codec, b, heads, k, dim, dtype, slots.device)
        self.n = -(-k // group) * group  # k rounded up to whole groups

    def keep(self, v: torch.Tensor) -> None:
        """v [B, H, T, D]: the prompt's values, all slots from 0."""
        b, h, _, d = v.shape
        idx = torch.nn.functional.pad(self.slots, (0, self.n - self.slots.shape[1]), value=-1)  # [B, n]
        chosen = v.gather(2, idx.clamp(min=0)[:, None, :, None].expand(b, h, self.n, d))  # [B, H, n, D]
        self.store.write(0, self.codec.encode(chosen, idx >= 0))

    def apply(self, v: torch.Tensor, n_quantized: int) -> torch.Tensor:
        """v [B, H, S, D] as read from the cache, its first n_quantized slots dequantized: the
        salient ones among those replaced by their 2-bit values."""
        b, h, s, d = v.shape
        k = self.slots.shape[1]
        use = (self.slots >= 0) & (self.slots < n_quantized)  # [B, k]
        where = torch.full((b, s + 1), -1, dtype=torch.long, device=v.device)  # slot -> salient index
        where.scatter_(1, torch.where(use, self.slots, s), torch.arange(k, device=v.device).expand(b, k))
        where = where[:, :s]
        kept = self.store.read(self.n)[:, :, :k].to(v.dtype)  # [B, H, k, D]
        picked = kept.gather(2, where.clamp(min=0)[:, None, :, None].expand(b, h, s, d))
        return torch.where((where >= 0)[:, None, :, None], picked, v)
