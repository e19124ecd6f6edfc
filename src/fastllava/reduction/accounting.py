"""What a prefill costs: visual tokens per layer, their layer-weighted average, and FLOPs.

Prefill FLOPs of one Llama block on n tokens of width d with FFN width m:
4nd² (q, k, v, o projections) + 2n²d (scores and weighted sum) + 3ndm (gate, up, down), the
estimate used by FastV and later papers (multiply-adds counted once; GQA, norms, RoPE and the
output head left out). The prefill total sums it over the layers, each with its own n.
"""

from __future__ import annotations


def layer_flops(n: int, d: int, m: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def visual_per_layer(counts: list[int], cuts: list[int], num_layers: int) -> list[int]:
    """Visual tokens each layer processes: counts[0] enter, counts[i + 1] remain after layer cuts[i]."""
    return [counts[sum(1 for c in cuts if c < layer)] for layer in range(num_layers)]


def prefill_stats(text_tokens: int, counts: list[int], cuts: list[int], num_layers: int, d: int, m: int) -> dict:
    """Stats of one prompt: `visual_tokens` (entering the LLM, then after each cut),
    `visual_tokens_equivalent` (layer-weighted mean), `prefill_flops` (see the module doc)."""
    per_layer = visual_per_layer(counts, cuts, num_layers)
    return {
        "visual_tokens": list(counts),
        "visual_tokens_equivalent": round(sum(per_layer) / num_layers, 2),
        "prefill_flops": sum(layer_flops(text_tokens + v, d, m) for v in per_layer),
    }
