"""Quantization: KV-cache layouts (KIVI, VidKV) and weight-only int8/int4 linear layers."""

from .spec import KVSpec, WeightSpec, parse_kv_cache, parse_weights

__all__ = ["KVSpec", "WeightSpec", "parse_kv_cache", "parse_weights"]
