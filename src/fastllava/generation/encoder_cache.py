"""The encoder cache: what the vision tower and projector made of an image, kept for the next
request that sends the same image.

The tower encodes each image (or LLaVA-NeXT tile, or video frame) on its own, so its outputs
can be kept per row of pixel values. A row is keyed by a hash of its preprocessed pixels (shape,
dtype and bytes: the preprocessing is in them) and by the vision blocks whose class-token
attention a reduction method asked for; the value is every tensor the tower returned for that
row (vision features, projected features, class-token attention and keys). Rows seen before are
taken from the cache, the others are encoded together in one call. The cache is a least
recently used map bounded in bytes; a reduction method before the language model runs on the
cached features afterwards, so one entry serves every reduction spec.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..models.llava import Tower


def pixel_digest(pixels: torch.Tensor) -> bytes:
    """A 32-byte hash of a tensor's shape, dtype and values (pixels [C, H, W] of one image or tile)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{tuple(pixels.shape)}|{pixels.dtype}".encode())
    h.update(pixels.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class EncoderCache:
    """A bounded LRU of per-row tower outputs. `wrap(tower)` gives a Tower that reads and fills it."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("an encoder cache needs a positive size")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0  # rows

    def wrap(self, tower: Tower) -> Tower:
        def cached(pixel_values: torch.Tensor, blocks: tuple = ()) -> tuple[torch.Tensor, ...]:
            return self.encode(tower, pixel_values, blocks)

        return cached

    def encode(self, tower: Tower, pixel_values: torch.Tensor, blocks: tuple) -> tuple[torch.Tensor, ...]:
        """tower(pixel_values [N, C, H, W], blocks) with the rows seen before taken from the cache."""
        keys = [(pixel_digest(row), tuple(blocks)) for row in pixel_values]
        found = [self.entries.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=pixel_values.device)
            out = tower(pixel_values.index_select(0, index), blocks)  # each [M, ...]
            for j, i in enumerate(missing):
                found[i] = tuple(t[j].clone() for t in out)  # a row of its own, not a view of the batch
                if keys[i] not in self.entries:  # the same image twice in one call: stored once
                    self._put(keys[i], found[i])
        for k in keys:
            if k in self.entries:
                self.entries.move_to_end(k)
        return tuple(torch.stack(parts) for parts in zip(*found))  # each [N, ...]

    def _put(self, key: tuple, value: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= sum(t.numel() * t.element_size() for t in old)
            self.evictions += 1
