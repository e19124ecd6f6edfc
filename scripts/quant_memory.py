"""Memory of the KV-cache layouts and weight formats at LLaVA-1.5-7B shapes, as allocated (on
PyTorch's meta device: exact sizes, no memory or GPU needed). Prints the tables of docs/quantization.md."""

import torch

from fastllava.bench.presets import preset_config
from fastllava.models.llava import LlavaModel
from fastllava.quant.kvcache import new_kv_cache
from fastllava.quant.weights import parameter_bytes, quantize_weights

cfg = preset_config("llava-1.5-7b")
t = cfg.text
slots = (640, 1024, 4096)
print("| KV cache | " + " | ".join(f"{s} slots" for s in slots) + " | vs fp at 4096 | per token, asymptotic |")
print("|---" * (len(slots) + 3) + "|")
fp = {}
for spec in ("fp", "kivi:bits=4", "kivi:bits=2", "vidkv"):
    sizes = [new_kv_cache(spec, t.num_hidden_layers, 1, t.num_key_value_heads, s, t.head_dim, torch.float16,
                          "meta").nbytes for s in slots + (65536,)]
    fp = fp or sizes
    per_token = (sizes[-1] - sizes[-2]) / (65536 - slots[-1]) / 1024  # the residual cancels out
    print(f"| {spec} | " + " | ".join(f"{b / 2**20:.1f}" for b in sizes[:-1])
          + f" | {sizes[-2] / fp[-2]:.3f} | {per_token:.0f} KiB |")
print("\n| weights (float16 checkpoint) | all parameters | decoder layers |\n|---|---|---|")
for spec in (None, "int8", "int4", "int4:vision=1"):
    with torch.device("meta"):
        model = LlavaModel(cfg).to(torch.float16)
    quantize_weights(model, spec)
    print(f"| {spec or 'fp'} | {parameter_bytes(model) / 2**30:.2f} GiB "
          f"| {parameter_bytes(model.language_model.layers) / 2**30:.2f} GiB |")
