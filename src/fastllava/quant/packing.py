"""Bit packing of small integer codes into bytes, so that quantized tensors take the memory
their bit width promises.

`pack_bits` stores codes of 1, 2, 4 or 8 bits, 8 // bits per byte, along the last dimension;
`pack_trits` stores ternary codes {0, 1, 2} five per byte (3**5 = 243 <= 256: 1.6 bits a code,
the closest a byte layout gets to log2(3) = 1.58).
"""

from __future__ import annotations

import torch

BIT_WIDTHS = (1, 2, 4, 8)
TRITS_PER_BYTE = 5


def packed_len(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits."""
    per = 8 // bits
    return (n + per - 1) // per


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., N] (integers in [0, 2**bits)) -> uint8 [..., ceil(N * bits / 8)]."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f"cannot pack {bits}-bit codes; widths: {BIT_WIDTHS}")
    per = 8 // bits
    n = codes.shape[-1]
    pad = packed_len(n, bits) * per - n
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, per)  # [..., bytes, per]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=c.device)  # [per]
    return (c << shifts).sum(-1, dtype=torch.uint8) if per > 1 else c[..., 0]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., bytes] -> codes uint8 [..., n] (the inverse of pack_bits)."""
    if bits == 8:
        return packed[..., :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed[..., None] >> shifts) & mask  # [..., bytes, per]
    return codes.flatten(-2)[..., :n]


def packed_trits_len(n: int) -> int:
    return (n + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes [..., N] in {0, 1, 2} -> uint8 [..., ceil(N / 5)], base 3, first code lowest."""
    n = codes.shape[-1]
    pad = packed_trits_len(n) * TRITS_PER_BYTE - n
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, TRITS_PER_BYTE)  # [..., bytes, 5]
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=c.device)  # [5]
    return (c * powers).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., bytes] -> ternary codes uint8 [..., n] in {0, 1, 2}."""
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32)[..., None] // powers) % 3  # [..., bytes, 5]
    return codes.flatten(-2)[..., :n].to(torch.uint8)
