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
- Optional salient-token preservation: the visual tokens most related to the text (mean dot
  product with the text tokens' embeddings) keep 2-bit values. `salient_tokens` scores them; the
  cache does not apply it yet (it needs the prompt's embeddings at prefill).
- Recent tokens stay in full precision as in KIVI (residual window, default 128).

Where the authors' public code (github.com/KD-TAO/VidKV) and the paper disagree we follow the
paper: (1) the code dequantizes 1.58-bit values to the bare codes {-1, 0, 1}, dropping the scale
it computed; we reconstruct alpha * code. (2) The code stores 1-bit codes as {0, 1} and
dequantizes them to {0, alpha}; we reconstruct sign quantization, {-alpha, +alpha}. (3) The code
quantizes real and imaginary parts of a complex FFT, i.e. 2 numbers per normal channel, so its
"1-bit" channels cost 2 bits; we use the real FFT, whose D real degrees of freedom cost exactly
1 bit per channel as the paper counts. (4) The code stores ternary codes in 2 bits; we pack five
per byte (1.6 bits). Our own choice, not the paper's: channels are ranked per sequence, head and
token group (the code ranks them once over the whole batch and all heads).
"""

from __future__ import annotations

import torch

from .packing import pack_bits, pack_trits, packed_len, packed_trits_len, unpack_bits, unpack_trits
from .quantizers import (absmean, minmax_decode, minmax_encode, minmax_params, sign_decode, sign_encode,
                         ternary_decode, ternary_encode)
from .store import Part


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


def salient_tokens(visual: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """VidKV's salient visual tokens: visual [B, N, D] and text [B, M, D] embeddings; the
    round(ratio * N) visual tokens with the highest mean dot product with the row's real text
    tokens (text_valid [B, M]). Returns their indices [B, k], ascending."""
    sim = visual.float() @ text.float().transpose(1, 2)  # [B, N, M]
    sim = sim.masked_fill(~text_valid[:, None, :], 0.0).sum(-1) / text_valid.sum(-1, keepdim=True).clamp(min=1)
    k = round(ratio * visual.shape[1])
    return sim.topk(k, dim=-1).indices.sort(dim=-1).values
