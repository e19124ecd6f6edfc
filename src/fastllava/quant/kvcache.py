"""A KV cache that stores keys and values quantized (KIVI or VidKV), with the slot bookkeeping
and interface of StaticKVCache: attention writes a step with `update` and gets back the keys and
values of the slots it attends to, dequantized (the store) or as written (the full-precision residual), ready for SDPA.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..kvcache import StaticKVCache
from . import kivi, vidkv
from .spec import KVSpec, parse_kv_cache
from .store import QuantizedSequence


def _sequences(spec: KVSpec, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
               device) -> tuple[QuantizedSequence, QuantizedSequence]:
    """Keys and values of one layer."""
    if spec.method == "kivi":
        channels = min(spec.group, head_dim)
        if head_dim % channels:
            raise UserError(f"kivi group {spec.group} does not divide the head size {head_dim}; "
                            f"use a divisor of {head_dim}")
        key = (kivi.KeyCodec(spec.bits, spec.group), "chunk")
        value = (kivi.ValueCodec(spec.bits, channels), "window")
    else:
        key = (vidkv.KeyCodec(spec.group, spec.high, head_dim), "chunk")
        value = (vidkv.ValueCodec(spec.group), "chunk")
    return tuple(QuantizedSequence(codec, flush, spec.residual, batch, heads, max_len, head_dim, dtype, device)
                 for codec, flush in (key, value))


class QuantizedKVCache(StaticKVCache):
    """StaticKVCache's slots, lengths and valid masks (inherited, so token reduction's stages work
    unchanged); keys and values live in per-layer quantized sequences instead of dense buffers."""

    def __init__(self, spec: KVSpec, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # head_dim 0: the base class keeps only its bookkeeping; its dense buffers stay empty.
        super().__init__(num_layers, batch, kv_heads, max_len, 0, dtype, device)
        self.spec, self.dtype = spec, dtype
        self.layers = [_sequences(spec, batch, kv_heads, max_len, head_dim, dtype, device)
                       for _ in range(num_layers)]
        self.salient: list[vidkv.SalientValues] = []  # per layer, set by `prompt`

    def prompt(self, embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> None:
        """Before the prefill: embeds [B, T, D] the language model's inputs, visual [B, T] its
        visual tokens, valid [B, T] its real ones. VidKV with salient > 0 picks the tokens whose
        values also keep 2 bits."""
        if self.spec.method != "vidkv" or not self.spec.salient:
            return
        slots = vidkv.salient_slots(embeds, visual, valid, self.spec.salient)  # [B, k]
        if slots.shape[1]:
            _, h, _, d = self.layers[0][1].res.shape
            self.salient = [vidkv.SalientValues(slots, self.spec.group, h, d, self.dtype)
                            for _ in self.layers]

    def update(self, layer: int, slot: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """StaticKVCache.update: append k, v [B, Hkv, T, Dh] at slots slot.. (the next ones: codes
        are packed in order) and return the keys/values of the first `span` slots, read back from
        the store (zeros past the slots written, which `valid` masks)."""
        start = int(slot) if isinstance(slot, int) else int(slot.reshape(-1)[0])
        keys, values = self.layers[layer]
        held = keys.n_quantized + keys.n_residual
        if start != held:
            raise RuntimeError(f"quantized KV cache layer {layer} holds {held} slots; cannot write at {start}")
        valid = self.valid[layer, :, :start + k.shape[2]]  # [B, S]
        n_quantized = values.n_quantized  # what the returned values read from the store
        flush = not self.defer
        k_all, v_all = keys.append(k, valid, flush), values.append(v, valid, flush)
        # salient slots index the prompt as prefilled: layers after an in-LLM cut hold another layout
        salient = self.salient[layer] if self.salient and layer < self.stage_layers(0).stop else None
        if salient is not None and start == 0:
            salient.keep(v)
        if salient is not None and n_quantized:
            v_all = salient.apply(v_all, n_quantized)
        return _to_span(k_all, span), _to_span(v_all, span)

    def rewind(self, first: int, start: int) -> None:
        """StaticKVCache.rewind, and the quantized sequences of the stage's layers too (the slots
        forgotten were written in this speculative round, so they are still unquantized)."""
        super().rewind(first, start)
        for layer in self.stage_layers(first):
            for seq in self.layers[layer]:
                seq.rewind(start)

    def settle(self) -> None:
        """End a speculative round: quantize what its appends held back, as plain steps would have."""
        self.defer = False
        for layer, seqs in enumerate(self.layers):
            for seq in seqs:
                seq.settle(self.valid[layer])

    def insert_row(self, row: int, src: StaticKVCache, src_row: int = 0, reset: bool = False) -> None:
        """StaticKVCache.insert_row for quantized layouts: src (the same layout) row `src_row` is
        read back to full precision and encoded again into `row`, right-aligned at the shared
        length (exact where groups stay aligned: min-max codes reproduce themselves). Salient
        values (VidKV) belong to one prompt and are not carried into a shared batch."""
        if not isinstance(src, QuantizedKVCache) or src.spec != self.spec:
            raise RuntimeError(f"insert_row needs a source cache of the same layout ({self.spec})")
        super().insert_row(row, src, src_row, reset)  # slots, stages, valid masks, lengths
        self.salient = []
        for layer, (mine, theirs) in enumerate(zip(self.layers, src.layers)):
            for seq, source in zip(mine, theirs):
                if reset:
                    seq.clear()
                seq.grow(self.lengths[layer], self.valid[layer])
                seq.put_row(row, source.read_row(src_row).to(seq.res.dtype), self.valid[layer, row])

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers) + sum(s.store.nbytes for s in self.salient)


def _to_span(x: torch.Tensor, span: int) -> torch.Tensor:
    """x [B, H, S, D] cut or zero-padded to `span` slots."""
    if x.shape[2] >= span:
        return x[:, :, :span]
    return torch.cat([x, x.new_zeros(*x.shape[:2], span - x.shape[2], x.shape[3])], dim=2)


def new_kv_cache(spec: str | KVSpec | None, num_layers: int, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> StaticKVCache:
    """The cache a spec asks for: StaticKVCache for "fp"/None, else a QuantizedKVCache."""
    spec = parse_kv_cache(spec)
    cls_args = (num_layers, batch, kv_heads, max_len, head_dim, dtype, device)
    return StaticKVCache(*cls_args) if spec is None else QuantizedKVCache(spec, *cls_args)
