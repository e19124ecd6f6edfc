"""Elementary quantizers over one reduction dimension, with an optional validity mask so that
padding never widens a range or shifts a scale.

- asymmetric min-max (KIVI): codes in [0, 2**bits), x ~ code * scale + min;
- sign (1 bit): codes in {0, 1}, x ~ alpha * (2 * code - 1) with alpha = mean |x|;
- ternary (1.58 bit, "absmean" as in BitNet b1.58): codes in {0, 1, 2},
  x ~ alpha * (code - 1) with alpha = mean |x| and code - 1 = round(clamp(x / alpha, -1, 1)).

Every function reduces over `dim` with keepdim, so parameters broadcast back onto the input.
Codes are uint8, unpacked (see packing.py).
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, valid: torch.Tensor | None, fill: float) -> torch.Tensor:
    return x if valid is None else x.masked_fill(~valid, fill)


def minmax_params(x: torch.Tensor, dim: int, bits: int,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) of asymmetric min-max quantization over `dim` (keepdim). `valid`
    (broadcastable to x) marks the entries that count; groups with none get scale 0, min 0."""
    x = x.float()
    mn = _masked(x, valid, float("inf")).amin(dim, keepdim=True)
    mx = _masked(x, valid, float("-inf")).amax(dim, keepdim=True)
    empty = torch.isinf(mn)
    mn = mn.masked_fill(empty, 0.0)
    mx = mx.masked_fill(empty, 0.0)
    return (mx - mn) / (2**bits - 1), mn


def minmax_encode(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((x.float() - mn) / safe).round().clamp(0, 2**bits - 1).to(torch.uint8)


def minmax_decode(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + mn.float()


def absmean(x: torch.Tensor, dim: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean |x| over `dim` (keepdim), counting only valid entries (0 where there are none)."""
    a = x.float().abs()
    if valid is None:
        return a.mean(dim, keepdim=True)
    valid = valid.expand_as(a)
    total = a.masked_fill(~valid, 0.0).sum(dim, keepdim=True)
    return total / valid.sum(dim, keepdim=True).clamp(min=1)


def sign_encode(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0).to(torch.uint8)


def sign_decode(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return (codes.float() * 2 - 1) * alpha.float()


def ternary_encode(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    return ((x.float() / safe).clamp(-1, 1).round() + 1).to(torch.uint8)


def ternary_decode(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return (codes.float() - 1) * alpha.float()
