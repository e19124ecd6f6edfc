"""KIVI: asymmetric 2/4-bit KV-cache quantization with a full-precision residual.

Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu: "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", ICML 2024 (arXiv:2402.02750).

- Keys are quantized per channel: for each channel, a group of `group` consecutive tokens shares
  one min-max scale (outlier channels then only spoil their own range).
- Values are quantized per token: each token's channels, in groups of `group` channels, share one
  scale (attention mixes values per token, so per-token error stays local).
- Both with asymmetric min-max rounding. The most recent tokens stay in full precision: key
  residual of up to `residual` tokens, quantized all at once when full (its length is then a
  multiple of the group); value residual sliding over the `residual` most recent tokens.
- As in the paper, attention of the step that writes tokens (prefill included) reads those tokens
  in full precision; later steps read the quantized store plus the residual.
"""

from __future__ import annotations

import torch

from .packing import pack_bits, packed_len, unpack_bits
from .quantizers import minmax_decode, minmax_encode, minmax_params
from .store import Part


class KeyCodec:
    """Per-channel min-max over groups of `group` tokens."""

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group

    def parts(self, dim: int) -> dict[str, Part]:
        return {"codes": Part((packed_len(dim, self.bits),), torch.uint8, 1),
                "scale": Part((dim,), None, self.group), "min": Part((dim,), None, self.group)}

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = x.shape
        xg = x.view(b, h, n // self.group, self.group, d)  # [B, H, n/G, G, D]
        vg = valid.view(b, 1, n // self.group, self.group, 1)
        scale, mn = minmax_params(xg, 3, self.bits, vg)  # [B, H, n/G, 1, D]
        codes = minmax_encode(xg, scale, mn, self.bits).view(b, h, n, d)
        return {"codes": pack_bits(codes, self.bits), "scale": scale[:, :, :, 0], "min": mn[:, :, :, 0]}

    def decode(self, parts: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        b, h, _, d = parts["scale"].shape
        codes = unpack_bits(parts["codes"], self.bits, d).view(b, h, n // self.group, self.group, d)
        x = minmax_decode(codes, parts["scale"][:, :, :, None], parts["min"][:, :, :, None])
        return x.view(b, h, n, d)


class ValueCodec:
    """Per-token min-max over groups of `channels` channels."""

    group = 1

    def __init__(self, bits: int, channels: int):
        self.bits, self.channels = bits, channels

    def parts(self, dim: int) -> dict[str, Part]:
        n_groups = dim // self.channels
        return {"codes": Part((packed_len(dim, self.bits),), torch.uint8, 1),
                "scale": Part((n_groups,), None, 1), "min": Part((n_groups,), None, 1)}

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, n, d = x.shape
        xg = x.view(b, h, n, d // self.channels, self.channels)  # [B, H, n, D/Gc, Gc]
        scale, mn = minmax_params(xg, 4, self.bits)
        codes = minmax_encode(xg, scale, mn, self.bits).view(b, h, n, d)
        return {"codes": pack_bits(codes, self.bits), "scale": scale[..., 0], "min": mn[..., 0]}

    def decode(self, parts: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        b, h, _, g = parts["scale"].shape
        d = g * self.channels
        codes = unpack_bits(parts["codes"], self.bits, d).view(b, h, n, g, self.channels)
        x = minmax_decode(codes, parts["scale"][..., None], parts["min"][..., None])
        return x.view(b, h, n, d)
