"""Model shapes to benchmark without downloading anything: real LLaVA sizes, random weights."""

from __future__ import annotations

import torch

from ..config import LlavaConfig
from ..errors import UserError
from ..models.llava import LlavaModel
from ..models import build_model

_CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _llama(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return {"model_type": "llama", "vocab_size": 32064, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0}


# HF-style config.json contents (what llava-hf/llava-1.5-*-hf ship), plus a tiny one for tests.
PRESETS: dict[str, dict] = {
    "llava-1.5-7b": {"vision_config": _CLIP_L_336, "text_config": _llama(4096, 11008, 32, 32),
                     "image_token_index": 32000, "vision_feature_layer": -2},
    "llava-1.5-13b": {"vision_config": _CLIP_L_336, "text_config": _llama(5120, 13824, 40, 40),
                      "image_token_index": 32000, "vision_feature_layer": -2},
    # llava-hf/llava-v1.6-vicuna-7b-hf: AnyRes with transformers' default pinpoints
    "llava-next-7b": {"model_type": "llava_next", "vision_config": _CLIP_L_336,
                      "text_config": _llama(4096, 11008, 32, 32), "image_token_index": 32000,
                      "vision_feature_layer": -2},
    # llava-hf/LLaVA-NeXT-Video-7B-hf: LLaVA-NeXT's shapes (vocabulary 32064, context 4096), <video> 32000,
    # <image> 32001, frames average-pooled 2 x 2 (144 tokens per frame)
    "llava-next-video-7b": {"model_type": "llava_next_video", "vision_config": _CLIP_L_336,
                            "text_config": _llama(4096, 11008, 32, 32), "image_token_index": 32001,
                            "video_token_index": 32000, "vision_feature_layer": -2, "spatial_pool_mode": "average",
                            "spatial_pool_stride": 2},
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m at 384 pixels (transformers' OneVision
    # defaults), Qwen2-7B (GQA 28/4 heads, biases on q, k, v), anyres_max_9; 1569 tokens for 8 frames
    "llava-onevision-7b": {"model_type": "llava_onevision",
                           "text_config": {"model_type": "qwen2", "vocab_size": 152128, "hidden_size": 3584,
                                           "intermediate_size": 18944, "num_hidden_layers": 28,
                                           "num_attention_heads": 28, "num_key_value_heads": 4,
                                           "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                           "rms_norm_eps": 1e-6, "tie_word_embeddings": False}},
    "tiny": {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 96, "patch_size": 4},
             "text_config": {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "pad_token_id": 0},
             "image_token_index": 255, "vision_feature_layer": -1},
}
PRESETS["tiny-next"] = {**PRESETS["tiny"], "model_type": "llava_next",
                        "image_grid_pinpoints": [[96, 192], [192, 96], [192, 192], [288, 96], [96, 288]]}
PRESETS["tiny-next-video"] = {**PRESETS["tiny-next"], "model_type": "llava_next_video", "image_token_index": 254,
                              "video_token_index": 255}


def preset_config(name: str) -> LlavaConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LlavaConfig.from_dict({"model_type": "llava", **PRESETS[name]})


@torch.no_grad()
def random_model(cfg: LlavaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlavaModel:
    """A model of `cfg`'s shapes allocated once on `device` in `dtype`, with random weights:
    N(0, 0.02) matrices and embeddings, unit norm scales, zero biases."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()
