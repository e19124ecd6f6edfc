"""Tiny random LLaVA models built with transformers (the reference), saved as HF checkpoints
in the key layouts found in the wild."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

IMAGE_TOKEN = 100
VOCAB = 128


# LLaVA-NeXT canvases for the tiny 32-pixel tower: transformers' defaults scaled from 336 to 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def tiny_llava(text: str = "llama", kv_heads: int = 4, feature_layer=-2, strategy: str = "default",
               tie: bool = False, seed: int = 0, pinpoints=None, **text_overrides):
    """A tiny random LlavaForConditionalGeneration, or with `pinpoints` (image_grid_pinpoints)
    a LlavaNextForConditionalGeneration."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig)

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  tie_word_embeddings=tie, pad_token_id=0)
    common.update(text_overrides)
    text_cfg = LlamaConfig(**common) if text == "llama" else MistralConfig(**common)
    kw = dict(vision_config=vision, text_config=text_cfg, image_token_index=IMAGE_TOKEN,
              vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
              image_seq_length=16 if strategy == "default" else 17, tie_word_embeddings=tie)
    if pinpoints is None:
        model = LlavaForConditionalGeneration(LlavaConfig(**kw)).eval()
    else:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**kw, image_grid_pinpoints=pinpoints)).eval()
    with torch.no_grad():  # random init leaves some tensors at exact constants; perturb all of them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _runtime_state(model) -> dict[str, torch.Tensor]:
    """Parameters under transformers' runtime names (model.language_model.*, model.vision_tower.*,
    model.multi_modal_projector.*, lm_head.*), tied head left out as save_pretrained does."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _rename(state: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in rules:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


LAYOUTS = {
    # transformers >= 4.52 runtime / save layout, CLIP tower nested under vision_model
    "new": [("model.vision_tower.", "model.vision_tower.vision_model.")],
    # the original llava-hf layout
    "original": [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),  # LLaVA-NeXT
    ],
}


def save_checkpoint(model, path: Path, layout: str = "saved", shards: int = 1) -> Path:
    """Write `model` to `path`: layout "saved" is whatever save_pretrained writes; "new" and
    "original" are the two documented key layouts; shards > 1 writes an index and shards."""
    path.mkdir(parents=True, exist_ok=True)
    if layout == "saved":
        model.save_pretrained(path, max_shard_size="40KB" if shards > 1 else "5GB")
        return path
    model.config.save_pretrained(path)
    state = _rename(_runtime_state(model), LAYOUTS[layout])
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def batch_inputs(features: int, seed: int = 1):
    """Two left-padded prompts of different lengths, each with one image: (ids, mask, pixels)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_before, n_after in ((3, 6), (1, 2)):
        before = torch.randint(3, IMAGE_TOKEN, (n_before,), generator=g)
        after = torch.randint(3, IMAGE_TOKEN, (n_after,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), before, torch.full((features,), IMAGE_TOKEN), after]))
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = r
        mask[i, longest - len(r):] = 1
    pixels = torch.randn(len(rows), 3, 32, 32, generator=g)
    return ids, mask, pixels


VIDEO_TOKEN = 101

# LLaVA-OneVision canvases for the tiny 32-pixel tower: transformers' defaults (1 x 1 to 6 x 6
# tiles of 384) scaled from 384 to 32
ONEVISION_PINPOINTS = [[32 * r, 32 * c] for r in range(1, 7) for c in range(1, 7)]


def tiny_onevision(kv_heads: int = 2, feature_layer=-1, tie: bool = False, seed: int = 0, pinpoints=None,
                   aspect: str = "anyres_max_9", **text_overrides):
    """A tiny random LlavaOnevisionForConditionalGeneration: SigLIP tower (32-pixel images, 8-pixel
    patches: 4 x 4 features per piece), Qwen2 decoder with q/k/v biases and a large RoPE theta."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8, vision_use_head=False)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=kv_heads, max_position_embeddings=1024, tie_word_embeddings=tie, pad_token_id=0,
                rope_theta=1e6, bos_token_id=1, eos_token_id=2)
    text.update(text_overrides)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, vision_feature_layer=feature_layer,
                               vision_feature_select_strategy="full", tie_word_embeddings=tie,
                               image_grid_pinpoints=pinpoints or ONEVISION_PINPOINTS, vision_aspect_ratio=aspect)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves some tensors at exact constants; perturb all of them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_next_video(text: str = "llama", kv_heads: int = 4, feature_layer=-2, tie: bool = False, seed: int = 0,
                    pool: str = "average", stride: int = 2, image_size: int = 32, **text_overrides):
    """A tiny random LlavaNextVideoForConditionalGeneration: CLIP tower (`image_size`-pixel images,
    8-pixel patches), LLaVA-NeXT's canvases scaled to it, frames pooled `pool` with `stride`."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, MistralConfig)

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=16)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=tie, pad_token_id=0)
    common.update(text_overrides)
    text_cfg = LlamaConfig(**common) if text == "llama" else MistralConfig(**common)
    pinpoints = [[h // 32 * image_size, w // 32 * image_size] for h, w in PINPOINTS]
    cfg = LlavaNextVideoConfig(vision_config=vision, text_config=text_cfg, image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, vision_feature_layer=feature_layer,
                               vision_feature_select_strategy="default", tie_word_embeddings=tie,
                               image_grid_pinpoints=pinpoints, spatial_pool_mode=pool, spatial_pool_stride=stride)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves some tensors at exact constants; perturb all of them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
