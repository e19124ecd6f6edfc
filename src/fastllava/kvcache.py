"""Preallocated (static) key/value cache for the language model."""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values for every layer in one buffer, filled left to right.

    All rows of a batch share the slot index of each step; left padding keeps them aligned,
    and `valid` marks which slots hold real tokens so that padding is never attended to.

    Each layer has its own length and valid mask, so that visual token reduction inside the
    language model can leave the layers after a cut with a compact cache: a *stage* is a run of
    consecutive layers sharing one slot layout, and `stages` lists the first layer of each
    (just [0] without reduction).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # one buffer per layer rather than one [L, ...] tensor: a compiled step that writes a slot
        # of a layer's buffer then mutates that input alone, not a view of every layer's cache
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x [B, Hkv, S, Dh]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(num_layers, batch, max_len, dtype=torch.bool, device=device)  # [L, B, S]
        self.lengths = [0] * num_layers  # slots in use, per layer
        self.stages = [0]  # first layer of each run of layers sharing a slot layout
        self.max_len = max_len
        # [L, B, S] float32 added to the attention logits of each slot's key (the log of the tokens
        # a merged visual token stands for: proportional attention); None until a reduction merges
        self.bias: torch.Tensor | None = None
        self.defer = False  # quantized layouts: a speculative round holds its tokens unquantized (settle)

    def settle(self) -> None:
        """End a speculative round (quantized layouts quantize what it held back; nothing here)."""
        self.defer = False

    def clear(self) -> None:
        """Empty the cache to be used again, keeping its buffers: no slot valid, one stage."""
        self.valid.zero_()
        self.lengths = [0] * len(self.lengths)
        self.stages = [0]
        self.bias = None

    @property
    def length(self) -> int:
        """Slots in use by the first layer (the uncompacted prompt plus generated tokens)."""
        return self.lengths[0]

    def stage_layers(self, first: int) -> range:
        """The layers of the stage starting at `first`."""
        later = [s for s in self.stages if s > first]
        return range(first, later[0] if later else len(self.lengths))

    def split(self, first: int) -> None:
        """Start a new stage at layer `first` (its layers are then reserved separately)."""
        if first not in self.stages:
            self.stages = sorted(self.stages + [first])

    def reserve(self, first: int, key_valid: torch.Tensor) -> tuple[int, int]:
        """Claim the next T slots in every layer of the stage starting at `first` for a step whose
        tokens are marked by key_valid [B, T]; returns the (start, end) slot range. Layers write
        into it with `update`."""
        layers = self.stage_layers(first)
        start = self.lengths[first]
        end = start + key_valid.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.valid[layers.start:layers.stop, :, start:end] = key_valid
        for i in layers:
            self.lengths[i] = end
        return start, end

    def rewind(self, first: int, start: int) -> None:
        """Forget slots start.. of the stage starting at layer `first`: its layers' length becomes
        `start` and those slots invalid (a speculation's drafts, written and then rejected)."""
        layers = self.stage_layers(first)
        self.valid[layers.start:layers.stop, :, start:] = False
        for i in layers:
            self.lengths[i] = start

    def keep_only(self, first: int, start: int, keep: torch.Tensor) -> None:
        """Of the T slots start.. of the stage starting at `first`, keep per row those keep [B, T]
        marks (invalid otherwise), and rewind the stage past the last slot any row keeps."""
        layers = self.stage_layers(first)
        self.valid[layers.start:layers.stop, :, start:start + keep.shape[1]] &= keep
        used = keep.any(0).nonzero()
        self.rewind(first, start + (int(used.max()) + 1 if len(used) else 0))

    def set_bias(self, first: int, start: int, bias: torch.Tensor) -> None:
        """Give the keys at slots start.. of the stage starting at layer `first` the attention
        bias [B, T]."""
        layers = self.stage_layers(first)
        self._bias_buffer()[layers.start:layers.stop, :, start:start + bias.shape[1]] = bias

    def _bias_buffer(self) -> torch.Tensor:
        """`bias`, made (all zeros: no key biased) on first use."""
        if self.bias is None:
            self.bias = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        return self.bias

    def key_bias(self, first: int, end: int) -> torch.Tensor | None:
        """The attention bias [B, end] of the first `end` slots of layer `first`, or None (no bias)."""
        return None if self.bias is None else self.bias[first, :, :end]

    def prompt(self, embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> None:
        """Told before the prefill what it holds: embeds [B, T, D], visual [B, T] its visual tokens,
        valid [B, T] its real ones. Nothing to do here; quantized layouts may use it."""

    def update(self, layer: int, slot: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, Dh] of `layer` at slots slot..slot+T (reserved before) and return
        the keys and values of its first `span` slots [B, Hkv, S, Dh] to attend to; `valid` says
        which of them hold real tokens. `slot` is an int, or a tensor of the T slot indices (a
        fixed-shape step: an index_put, which torch.compile keeps in place)."""
        if isinstance(slot, torch.Tensor):
            self.k[layer][:, :, slot] = k
            self.v[layer][:, :, slot] = v
        else:
            self.k[layer][:, :, slot:slot + k.shape[2]] = k
            self.v[layer][:, :, slot:slot + k.shape[2]] = v
        return self.k[layer][:, :, :span], self.v[layer][:, :, :span]

    def insert_row(self, row: int, src: "StaticKVCache", src_row: int = 0, reset: bool = False) -> None:
        """Copy row `src_row` of `src` (a cache after its prefill) into `row`, each layer's
        slots right-aligned to end at this cache's length; the length grows to src's if shorter
        (the slots gained are invalid for the other rows) and the row's older slots become
        invalid. Where src has compact stages (visual tokens dropped inside the language model),
        this cache is split there too, so that each stage's mask reads its own valid slots.
        `reset` first empties the cache (all rows) so that it starts again at slot 0."""
        t, length = src.length, 0 if reset else self.length
        if t > self.max_len:
            raise RuntimeError(f"KV cache overflow: {t} slots needed, {self.max_len} allocated")
        if reset:
            self.stages = [0]
            if self.bias is not None:
                self.bias.zero_()
        if src.bias is not None:
            self._bias_buffer()
        if self.bias is not None:
            self.bias[:, row] = 0
        for first in src.stages:
            self.split(first)
        self.valid[:, :, length:t] = False
        end = max(length, t)
        self.lengths = [end] * len(self.lengths)
        self.valid[:, row] = False
        for first in src.stages:
            ls, n = src.stage_layers(first), src.lengths[first]
            for i in ls:
                self.k[i][row, :, end - n:end] = src.k[i][src_row, :, :n]  # [Hkv, n, Dh]
                self.v[i][row, :, end - n:end] = src.v[i][src_row, :, :n]
            self.valid[ls.start:ls.stop, row, end - n:end] = src.valid[ls.start:ls.stop, src_row, :n]
            if src.bias is not None:
                self.bias[ls.start:ls.stop, row, end - n:end] = src.bias[ls.start:ls.stop, src_row, :n]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
