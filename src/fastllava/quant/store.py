"""Storage for one layer's quantized keys or values: packed codes and their parameters,
preallocated for the whole sequence, plus the most recent tokens in full precision.

A `Codec` turns a block of tokens [B, H, n, D] into named parts and back. Each part has one entry
per `tokens_per_entry` tokens along dim 2 (1 for per-token codes, the group size for per-group
scales), so that blocks written at token offsets land in fixed slices of preallocated buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Part:
    tail: tuple[int, ...]  # shape of one entry after [B, H, entries]
    dtype: torch.dtype | None  # None: the cache's dtype (scales, minima)
    tokens_per_entry: int


class Codec(Protocol):
    group: int  # tokens encoded together: every encoded block is a multiple of it

    def parts(self, dim: int) -> dict[str, Part]: ...

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, H, n, D], valid [B, n] -> parts, each [B, H, n / tokens_per_entry, *tail]."""
        ...

    def decode(self, parts: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """parts of n tokens -> float32 [B, H, n, D]."""
        ...


class PackedStore:
    """Preallocated buffers for `capacity` tokens of one codec."""

    def __init__(self, codec: Codec, batch: int, heads: int, capacity: int, dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.codec, self.dim = codec, dim
        capacity = -(-capacity // codec.group) * codec.group
        self.layout = codec.parts(dim)
        self.buffers = {
            name: torch.zeros(batch, heads, capacity // p.tokens_per_entry, *p.tail,
                              dtype=p.dtype or dtype, device=device)
            for name, p in self.layout.items()
        }

    def write(self, start: int, parts: dict[str, torch.Tensor], row: int | None = None) -> None:
        """Store encoded parts at token `start`, for all rows or (parts of batch 1) for one."""
        rows = slice(None) if row is None else slice(row, row + 1)
        for name, value in parts.items():
            per = self.layout[name].tokens_per_entry
            self.buffers[name][rows, :, start // per:start // per + value.shape[2]] = value

    def read(self, n: int) -> torch.Tensor:
        """The first n tokens, dequantized: float32 [B, H, n, D]."""
        if n == 0:
            b, h = next(iter(self.buffers.values())).shape[:2]
            return torch.zeros(b, h, 0, self.dim, device=next(iter(self.buffers.values())).device)
        parts = {name: buf[:, :, :n // self.layout[name].tokens_per_entry] for name, buf in self.buffers.items()}
        return self.codec.decode(parts, n)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class QuantizedSequence:
    """One layer's keys (or values): tokens [0, n_quantized) in a PackedStore, the rest in a
    full-precision residual buffer.

    flush="chunk" (KIVI's keys): the residual fills up to `residual` tokens and is then quantized
    as a whole, so it holds total % residual tokens. flush="window" (KIVI's values): the residual
    keeps at least the `residual` most recent tokens; older ones are quantized as soon as a whole
    group of them has left the window.

    A speculative round appends without flushing (`flush=False`; the residual grows for it),
    drops its rejected tokens from the residual (`rewind`) and then flushes what is due
    (`settle`): the tokens kept are quantized in the same groups as if they had been appended
    one by one.
    """

    def __init__(self, codec: Codec, flush: str, residual: int, batch: int, heads: int, max_len: int,
                 dim: int, dtype: torch.dtype, device: torch.device | str):
        if flush not in ("chunk", "window"):
            raise ValueError(f"unknown flush policy {flush!r}")
        self.codec, self.flush, self.residual = codec, flush, residual
        # sized for what max_len tokens can put in each: nothing is allocated that cannot be used
        self.store = PackedStore(codec, batch, heads, self._target(max_len), dim, dtype, device)
        self.res = torch.zeros(batch, heads, min(residual + codec.group, max_len), dim, dtype=dtype, device=device)
        self.n_quantized = 0
        self.n_residual = 0

    def _target(self, total: int) -> int:
        """How many of `total` tokens belong in the quantized store."""
        g = self.codec.group
        if self.flush == "chunk":
            return total // self.residual * self.residual if self.residual else total // g * g
        return max(0, total - self.residual) // g * g

    def append(self, x: torch.Tensor, valid: torch.Tensor, flush: bool = True) -> torch.Tensor:
        """Add x [B, H, n, D]; valid [B, total] marks real tokens of all slots so far. Returns all
        tokens [B, H, total, D]: the older ones dequantized, the residual and x as given. Without
        `flush` nothing is quantized now (see `settle`)."""
        nq, nr = self.n_quantized, self.n_residual
        recent = torch.cat([self.res[:, :, :nr], x], dim=2)  # [B, H, nr + n, D]
        older = self.store.read(nq).to(x.dtype)
        total = nq + recent.shape[2]
        target = self._target(total) if flush else nq
        moved = target - nq
        if moved:
            self.store.write(nq, self.codec.encode(recent[:, :, :moved], valid[:, nq:target]))
        keep = recent[:, :, moved:]
        if keep.shape[2] > self.res.shape[2]:
            if flush:
                raise RuntimeError(f"residual overflow: {keep.shape[2]} tokens for {self.res.shape[2]} slots")
            # a speculative round holds its tokens unquantized: the residual grows for it (once, by at most 2k + 1)
            b, h, n, d = self.res.shape
            self.res = torch.cat([self.res, self.res.new_zeros(b, h, keep.shape[2] - n, d)], dim=2)
        self.res[:, :, :keep.shape[2]] = keep
        self.n_quantized, self.n_residual = target, keep.shape[2]
        return torch.cat([older, recent], dim=2)

    def rewind(self, total: int) -> None:
        """Keep the first `total` tokens (the ones past them are still in the residual)."""
        if total < self.n_quantized:
            raise RuntimeError(f"cannot rewind to {total} tokens: {self.n_quantized} are quantized already")
        self.n_residual = min(self.n_residual, total - self.n_quantized)

    def settle(self, valid: torch.Tensor) -> None:
        """Quantize what appends without flushing left due (valid [B, >= total] as in append)."""
        nq, nr = self.n_quantized, self.n_residual
        target = self._target(nq + nr)
        moved = target - nq
        if moved > 0:
            self.store.write(nq, self.codec.encode(self.res[:, :, :moved], valid[:, nq:target]))
            self.res[:, :, :nr - moved] = self.res[:, :, moved:nr].clone()
            self.n_quantized, self.n_residual = target, nr - moved

    def clear(self) -> None:
        self.n_quantized = self.n_residual = 0

    def grow(self, total: int, valid: torch.Tensor) -> None:
        """Extend to `total` tokens with zeros (valid [B, >= total] marks them as padding)."""
        held = self.n_quantized + self.n_residual
        if total > held:
            b, h, _, d = self.res.shape
            self.append(self.res.new_zeros(b, h, total - held, d), valid[:, :total])

    def read_row(self, row: int) -> torch.Tensor:
        """All tokens of one row [H, n, D], the quantized ones dequantized (float32)."""
        older = self.store.read(self.n_quantized)[row]
        return torch.cat([older, self.res[row, :, :self.n_residual].float()], dim=1)

    def put_row(self, row: int, x: torch.Tensor, valid: torch.Tensor) -> None:
        """Replace one row by x [H, n, D] right-aligned at the end of the tokens held (valid
        [>= held] is the row's mask): its quantized part is encoded again, its residual copied."""
        nq, held = self.n_quantized, self.n_quantized + self.n_residual
        h, n, d = x.shape
        full = x.new_zeros(1, h, held, d)  # [1, H, held, D]
        full[0, :, held - n:] = x
        if nq:
            self.store.write(0, self.codec.encode(full[:, :, :nq], valid[None, :nq]), row)
        self.res[row, :, :held - nq] = full[0, :, nq:]

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.res.numel() * self.res.element_size()
