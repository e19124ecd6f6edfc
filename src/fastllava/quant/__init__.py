"""Quantization: KV-cache layouts (KIVI, VidKV) and weight-only int8/int4 linear layers."""

from .kvcache import QuantizedKVCache, new_kv_cache
from .spec import KVSpec, WeightSpec, parse_kv_cache, parse_weights
from .weights import QuantLinear, quantize_weights

__all__ = ["KVSpec", "WeightSpec", "parse_kv_cache", "parse_weights", "QuantizedKVCache", "new_kv_cache",
           "QuantLinear", "quantize_weights"]
