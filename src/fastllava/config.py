"""Model configuration read from a Hugging Face LLaVA `config.json`.

Missing keys take the defaults that transformers' own config classes use, because real
checkpoints (e.g. llava-hf/llava-1.5-7b-hf) store only the values that differ from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import anyres
from .errors import UserError

# transformers' LlavaConfig fills a missing vision_config with these CLIP ViT-L/14-336 values.
_LLAVA_VISION_DEFAULTS = {
    "intermediate_size": 4096,
    "hidden_size": 1024,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}

# transformers' LlavaNextConfig default (height, width) canvases for AnyRes tiling.
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Per text model type: the defaults of transformers' LlamaConfig / MistralConfig.
_TEXT_DEFAULTS = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "sliding_window": None,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
    },
}


@dataclass
class VisionConfig:
    """CLIP-style vision transformer."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise UserError(f"unsupported vision tower {model_type!r}; fastllava supports CLIP-style towers")
        merged = {**_LLAVA_VISION_DEFAULTS, **d}
        image_size, patch_size = merged.get("image_size", 224), merged.get("patch_size", 32)
        if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
            raise UserError("non-square vision image_size/patch_size is not supported")
        return cls(**_pick(cls, merged))


@dataclass
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | dynamic
    factor: float = 1.0


@dataclass
class TextConfig:
    """Llama / Mistral decoder."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in _TEXT_DEFAULTS:
            raise UserError(
                f"unsupported text model {model_type!r}; supported: {', '.join(sorted(_TEXT_DEFAULTS))}"
            )
        merged = {**_TEXT_DEFAULTS[model_type], **d}
        merged["model_type"] = model_type
        if merged.get("num_key_value_heads") is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        if merged.get("head_dim") is None:
            merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
        eos = merged.get("eos_token_id", 2)
        merged["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if merged.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported text hidden_act {merged['hidden_act']!r}; only 'silu' is supported")
        cfg = cls(**_pick(cls, merged, exclude={"rope"}))
        cfg.rope = _read_rope(d)
        return cfg


def _read_rope(d: dict) -> RopeConfig:
    """RoPE settings from either the legacy (`rope_theta` + `rope_scaling`) or the
    transformers >= 5 (`rope_parameters`) form."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    factor = params.get("factor", legacy.get("factor", 1.0))
    if kind not in ("default", "linear", "dynamic"):
        raise UserError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, dynamic")
    return RopeConfig(theta=float(theta), kind=kind, factor=float(factor))


@dataclass
class LlavaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_select_strategy: str = "default"
    vision_feature_layers: list[int] = field(default_factory=lambda: [-2])
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # LLaVA-NeXT (AnyRes) canvases; None for LLaVA-1.5

    @property
    def is_next(self) -> bool:
        """A LLaVA-NeXT model: images are tiled (AnyRes), their token count depends on their size."""
        return self.image_grid_pinpoints is not None

    @property
    def image_features_per_image(self) -> int:
        """Visual tokens one image gives the language model (576 for LLaVA-1.5); for LLaVA-NeXT,
        those of one tile (see image_tokens)."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    def image_tokens(self, height: int, width: int) -> int:
        """Visual tokens an image of height x width pixels (before preprocessing) gives."""
        if not self.is_next:
            return self.image_features_per_image
        return anyres.image_tokens((height, width), self.image_grid_pinpoints, self.vision.image_size,
                                   self.vision.grid)

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        model_type = d.get("model_type", "llava")
        if model_type not in ("llava", "llava_next"):
            raise UserError(f"unsupported model_type {model_type!r} in config.json; expected 'llava' or 'llava_next'")
        vision = VisionConfig.from_dict(d.get("vision_config") or {})
        text = TextConfig.from_dict(d.get("text_config") or {})
        layer = d.get("vision_feature_layer", -2)
        layers = [layer] if isinstance(layer, int) else list(layer)
        n = vision.num_hidden_layers
        for idx in layers:
            if not -(n + 1) <= idx <= n:
                raise UserError(f"vision_feature_layer {idx} is out of range for a {n}-layer vision tower")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise UserError(f"unknown vision_feature_select_strategy {strategy!r}; expected default or full")
        tie = bool(d.get("tie_word_embeddings", False)) or bool(
            (d.get("text_config") or {}).get("tie_word_embeddings", False)
        )
        text.tie_word_embeddings = tie
        pinpoints = None
        if model_type == "llava_next":
            pinpoints = _read_pinpoints(d.get("image_grid_pinpoints") or _NEXT_PINPOINTS, vision.image_size)
            if strategy != "default":
                raise UserError("LLaVA-NeXT needs vision_feature_select_strategy 'default' (tiles without the class token)")
        return cls(
            vision=vision,
            text=text,
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
            vision_feature_select_strategy=strategy,
            vision_feature_layers=layers,
            tie_word_embeddings=tie,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            image_grid_pinpoints=pinpoints,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlavaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no config.json in {path.parent}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: bad model configuration: {e}") from None


def _read_pinpoints(value, tile: int) -> list[tuple[int, int]]:
    """image_grid_pinpoints as (height, width) pairs, each a multiple of the tile size."""
    if not isinstance(value, list) or not value:
        raise UserError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {value!r}")
    out = []
    for p in value:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)):
            raise UserError(f"image_grid_pinpoints entry {p!r} is not a [height, width] pair of positive integers")
        if p[0] % tile or p[1] % tile:
            raise UserError(f"image_grid_pinpoints entry {list(p)} is not a multiple of the {tile}-pixel tile")
        out.append((p[0], p[1]))
    return out


def _pick(cls, d: dict, exclude: set[str] = frozenset()) -> dict:
    names = {f for f in cls.__dataclass_fields__ if f not in exclude}
    return {k: v for k, v in d.items() if k in names}


def to_hf_dict(cfg: LlavaConfig) -> dict:
    """A transformers-style LLaVA config.json for `cfg` (vision tower with all its layers)."""
    v, t = cfg.vision, cfg.text
    layers = cfg.vision_feature_layers
    next_keys = {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]} if cfg.is_next else {}
    return {
        "architectures": ["LlavaNextForConditionalGeneration" if cfg.is_next else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if cfg.is_next else "llava",
        **next_keys,
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.image_features_per_image,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.torch_dtype or "float32",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "num_channels": v.num_channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps, "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": t.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps, "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
            "sliding_window": t.sliding_window, "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id[0] if len(t.eos_token_id) == 1
            else t.eos_token_id, "pad_token_id": t.pad_token_id, "rope_theta": t.rope.theta,
            "rope_scaling": None if t.rope.kind == "default" else {"rope_type": t.rope.kind, "factor": t.rope.factor},
        },
    }
