"""Model configuration read from a Hugging Face LLaVA `config.json`.

Missing keys take the defaults that transformers' own config classes use, because real
checkpoints (e.g. llava-hf/llava-1.5-7b-hf) store only the values that differ from them.

Every value is checked before anything is built from it: sizes are integers within the bounds
below, floats finite and positive, flags booleans, names among the supported ones; a bad one is a
UserError naming the field (`text_config.num_attention_heads must be a positive integer, got 0`),
which `from_file` prefixes with the file.
"""

from __future__ import annotations

import json
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import anyres
from .errors import UserError
from .models.activations import ACTIVATIONS

# config.json is read whole; a bigger file is not a model config (real ones are a few KB).
MAX_CONFIG_BYTES = 1 << 20

# Generous upper bounds on the sizes a config.json may ask for: far above every released LLaVA
# (CLIP ViT-L/336 towers, 7B-110B decoders) yet low enough that a typo fails here, at once, rather
# than in the allocator. Whether the model fits in memory is checked when loading (checkpoint.py).
MAX_LAYERS = 1024
MAX_HIDDEN = 65536  # hidden sizes, head counts, head_dim
MAX_INTERMEDIATE = 4 * MAX_HIDDEN
MAX_VOCAB = 1_000_000
MAX_CHANNELS = 64
MAX_IMAGE = 16384  # pixels: image_size, patch_size, the sides of image_grid_pinpoints
MAX_POSITIONS = 1 << 26

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

# transformers' SiglipVisionConfig defaults (a vision_config of model_type siglip_vision_model).
_SIGLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}

# transformers' LlavaOnevisionConfig fills a missing vision_config with this SigLIP so400m tower
# (its last layer dropped), a missing text_config with Qwen2Config's defaults.
_ONEVISION_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
}

# transformers' LlavaOnevisionConfig default (height, width) canvases: 1 x 1 to 6 x 6 tiles of 384.
_ONEVISION_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]

# Per text model type: the defaults of transformers' LlamaConfig / MistralConfig / Qwen2Config.
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
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "sliding_window": None,  # only with use_sliding_window, which is refused
        "bos_token_id": None,
        "eos_token_id": None,
    },
}


@dataclass
class VisionConfig:
    """CLIP-style vision transformer, or SigLIP's (model_type "siglip": no class token, no
    pre-layernorm, a bias on the patch embedding)."""

    model_type: str = "clip"  # clip | siglip
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

    @property
    def class_token(self) -> bool:
        """Whether the tower prepends a class token (CLIP) or not (SigLIP)."""
        return self.model_type == "clip"

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config", siglip: bool = False) -> "VisionConfig":
        """`siglip`: a LLaVA-OneVision vision_config, which must be SigLIP's (CLIP's otherwise)."""
        if siglip:
            model_type = d.get("model_type", "siglip_vision_model")
            if model_type not in ("siglip_vision_model", "siglip"):
                raise UserError(f"unsupported vision tower {_shown(model_type)} for LLaVA-OneVision; "
                                "fastllava supports SigLIP towers there")
            merged = {**_SIGLIP_DEFAULTS, **(d or _ONEVISION_VISION_DEFAULTS)}
            _check_bool(d.get("vision_use_head", False), f"{where}.vision_use_head")  # its head is never read
            merged["model_type"] = "siglip"
            return cls._checked(merged, where)
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise UserError(f"unsupported vision tower {_shown(model_type)}; fastllava supports CLIP-style towers")
        merged = {**_LLAVA_VISION_DEFAULTS, **d, "model_type": "clip"}
        return cls._checked(merged, where)

    @classmethod
    def _checked(cls, merged: dict, where: str) -> "VisionConfig":
        image_size, patch_size = merged.get("image_size", 224), merged.get("patch_size", 32)
        if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
            raise UserError("non-square vision image_size/patch_size is not supported")
        cfg = cls(**_pick(cls, merged))
        _check_sizes(cfg, _VISION_SIZES, where)
        _check_multiple(cfg, "hidden_size", "num_attention_heads", where)
        if cfg.model_type == "clip":  # SigLIP's 384-pixel images in 14-pixel patches: the conv drops the rest
            _check_multiple(cfg, "image_size", "patch_size", where)
        elif cfg.patch_size > cfg.image_size:
            raise UserError(f"{where}.patch_size ({cfg.patch_size}) must be at most {where}.image_size "
                            f"({cfg.image_size})")
        _choice(cfg.hidden_act, f"{where}.hidden_act", ACTIVATIONS)
        cfg.layer_norm_eps = _positive_float(cfg.layer_norm_eps, f"{where}.layer_norm_eps")
        return cfg


@dataclass
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | dynamic
    factor: float = 1.0


@dataclass
class TextConfig:
    """Llama / Mistral / Qwen2 decoder."""

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
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2); attention_bias puts them on o_proj too
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> "TextConfig":
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in _TEXT_DEFAULTS:
            raise UserError(
                f"unsupported text model {_shown(model_type)}; supported: {', '.join(sorted(_TEXT_DEFAULTS))}"
            )
        merged = {**_TEXT_DEFAULTS[model_type], **d}
        merged["model_type"] = model_type
        if model_type == "qwen2":
            if _check_bool(merged.get("use_sliding_window", False), f"{where}.use_sliding_window"):
                raise UserError(f"{where}.use_sliding_window: Qwen2's per-layer sliding windows are not supported")
            merged["sliding_window"] = None
        merged["qkv_bias"] = model_type == "qwen2"  # Qwen2: biases on q, k and v (not on o_proj)
        if merged.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported text hidden_act {_shown(merged['hidden_act'])}; only 'silu' is supported")
        # None until checked: as many key/value heads as attention heads, head_dim hidden_size / heads
        merged.setdefault("num_key_value_heads", None)
        merged.setdefault("head_dim", None)
        merged["eos_token_id"] = _token_ids(merged.get("eos_token_id", 2), f"{where}.eos_token_id")
        cfg = cls(**_pick(cls, merged, exclude={"rope"}))
        _check_sizes(cfg, _TEXT_SIZES, where)
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.head_dim is None:
            _check_multiple(cfg, "hidden_size", "num_attention_heads", where)
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        _check_multiple(cfg, "num_attention_heads", "num_key_value_heads", where)  # grouped-query attention
        if cfg.head_dim % 2:
            raise UserError(f"{where}.head_dim must be even (rotary embeddings rotate pairs), got {cfg.head_dim}")
        cfg.rms_norm_eps = _positive_float(cfg.rms_norm_eps, f"{where}.rms_norm_eps")
        for name in ("attention_bias", "qkv_bias", "mlp_bias"):
            _check_bool(getattr(cfg, name), f"{where}.{name}")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(cfg, name) is not None:
                _check_int(getattr(cfg, name), f"{where}.{name}", lo=None)
        cfg.rope = _read_rope(d, where)
        return cfg


def _read_rope(d: dict, where: str) -> RopeConfig:
    """RoPE settings from either the legacy (`rope_theta` + `rope_scaling`) or the
    transformers >= 5 (`rope_parameters`) form."""
    params = _section(d.get("rope_parameters"), f"{where}.rope_parameters")
    legacy = _section(d.get("rope_scaling"), f"{where}.rope_scaling")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    factor = params.get("factor", legacy.get("factor", 1.0))
    if not isinstance(kind, str) or kind not in ("default", "linear", "dynamic"):
        raise UserError(f"unsupported RoPE scaling {_shown(kind)}; supported: default, linear, dynamic")
    return RopeConfig(theta=_positive_float(theta, f"{where}.rope_theta"), kind=kind,
                      factor=_positive_float(factor, f"{where}.rope_scaling.factor"))


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
    model_type: str = "llava"  # llava | llava_next | llava_onevision
    max_tiles: int | None = None  # LLaVA-OneVision's vision_aspect_ratio anyres_max_N: N
    video_token_index: int | None = None  # LLaVA-OneVision, LLaVA-NeXT-Video
    spatial_pool_mode: str = "average"  # LLaVA-NeXT-Video: how each frame's grid is pooled (average | max | conv)
    spatial_pool_stride: int = 2  # LLaVA-NeXT-Video: the pooling window and stride, in features

    @property
    def is_next(self) -> bool:
        """A LLaVA-NeXT or LLaVA-OneVision model: images are tiled (AnyRes), their token count
        depends on their size."""
        return self.image_grid_pinpoints is not None

    @property
    def is_onevision(self) -> bool:
        """A LLaVA-OneVision model: SigLIP tower, Qwen2 decoder, AnyRes with large tile grids
        scaled down (anyres_max_N), videos."""
        return self.model_type == "llava_onevision"

    @property
    def is_next_video(self) -> bool:
        """A LLaVA-NeXT-Video model: LLaVA-NeXT's images, and videos whose frames' feature grids are
        pooled (spatial_pool_mode, spatial_pool_stride) before the projector."""
        return self.model_type == "llava_next_video"

    @property
    def takes_videos(self) -> bool:
        """Whether the model takes videos (LLaVA-OneVision, LLaVA-NeXT-Video)."""
        return self.is_onevision or self.is_next_video

    @property
    def image_features_per_image(self) -> int:
        """Visual tokens one image gives the language model (576 for LLaVA-1.5); for LLaVA-NeXT,
        those of one tile (see image_tokens)."""
        extra = 1 if self.vision_feature_select_strategy == "full" and self.vision.class_token else 0
        return self.vision.num_patches + extra

    def image_tokens(self, height: int, width: int, tiled: bool = True) -> int:
        """Visual tokens an image of height x width pixels (before preprocessing) gives; `tiled`
        False: a LLaVA-OneVision image sharing its prompt with others (its thumbnail and one newline)."""
        if self.is_onevision and not tiled:
            return self.vision.num_patches + 1
        if not self.is_next:
            return self.image_features_per_image
        return anyres.image_tokens((height, width), self.image_grid_pinpoints, self.vision.image_size,
                                   self.vision.grid, self.max_tiles)

    def video_tokens(self, frames: int) -> int:
        """Visual tokens a video of `frames` frames gives: `frame_tokens` each, and on
        LLaVA-OneVision one image_newline that ends the video."""
        return frames * self.frame_tokens + (0 if self.is_next_video else 1)

    @property
    def frame_tokens(self) -> int:
        """Visual tokens of one video frame: LLaVA-OneVision pools its feature grid 2 x 2 (rounded
        up), LLaVA-NeXT-Video spatial_pool_stride x spatial_pool_stride (rounded down)."""
        side = self.vision.grid // self.spatial_pool_stride if self.is_next_video else -(-self.vision.grid // 2)
        return side * side

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        model_type = d.get("model_type", "llava")
        if model_type not in ("llava", "llava_next", "llava_onevision", "llava_next_video"):
            raise UserError(f"unsupported model_type {_shown(model_type)}; expected 'llava', 'llava_next', "
                            "'llava_onevision' or 'llava_next_video'")
        onevision = model_type == "llava_onevision"
        vision = VisionConfig.from_dict(_section(d.get("vision_config"), "vision_config"), siglip=onevision)
        text_dict = _section(d.get("text_config"), "text_config")
        if onevision and not text_dict:
            text_dict = {"model_type": "qwen2"}  # transformers' default text_config for OneVision
        text = TextConfig.from_dict(text_dict)
        layers = _feature_layers(d.get("vision_feature_layer", -1 if onevision else -2), vision.num_hidden_layers)
        strategy = d.get("vision_feature_select_strategy", "full" if onevision else "default")
        if strategy not in ("default", "full"):
            raise UserError(f"unknown vision_feature_select_strategy {_shown(strategy)}; expected default or full")
        tie = _check_bool(d.get("tie_word_embeddings", False), "tie_word_embeddings") or _check_bool(
            text_dict.get("tie_word_embeddings", False), "text_config.tie_word_embeddings")
        text.tie_word_embeddings = tie
        pinpoints = max_tiles = video_token = None
        pool_mode, pool_stride = "average", 2
        if onevision:
            pinpoints = d.get("image_grid_pinpoints")
            pinpoints = _read_pinpoints(_ONEVISION_PINPOINTS if pinpoints is None else pinpoints, vision.image_size)
            max_tiles = _max_tiles(d.get("vision_aspect_ratio", "anyres_max_9"))
            if strategy != "full":
                raise UserError("LLaVA-OneVision needs vision_feature_select_strategy 'full' "
                                "(SigLIP has no class token)")
            video_token = _check_int(d.get("video_token_index", d.get("video_token_id", 151647)), "video_token_index",
                                     lo=0)
        elif model_type in ("llava_next", "llava_next_video"):
            pinpoints = d.get("image_grid_pinpoints")
            pinpoints = _read_pinpoints(_NEXT_PINPOINTS if pinpoints is None else pinpoints, vision.image_size)
            if strategy != "default":
                raise UserError("LLaVA-NeXT needs vision_feature_select_strategy 'default' (tiles without the class token)")
        if model_type == "llava_next_video":
            video_token = _check_int(d.get("video_token_index", d.get("video_token_id", 32000)), "video_token_index",
                                     lo=0)
            pool_mode, pool_stride = _spatial_pool(d, vision, len(layers))
        return cls(
            vision=vision,
            text=text,
            image_token_index=_check_int(d.get("image_token_index", d.get("image_token_id", _IMAGE_TOKEN[model_type])),
                                         "image_token_index", lo=0),
            projector_hidden_act=_choice(d.get("projector_hidden_act", "gelu"), "projector_hidden_act", ACTIVATIONS),
            projector_bias=_check_bool(d.get("multimodal_projector_bias", True), "multimodal_projector_bias"),
            vision_feature_select_strategy=strategy,
            vision_feature_layers=layers,
            tie_word_embeddings=tie,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            image_grid_pinpoints=pinpoints,
            model_type=model_type,
            max_tiles=max_tiles,
            video_token_index=video_token,
            spatial_pool_mode=pool_mode,
            spatial_pool_stride=pool_stride,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlavaConfig":
        path = Path(path)
        d = read_json_file(path)
        if not isinstance(d, dict):
            raise UserError(f"{path} must hold a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:  # a value no check above foresaw
            raise UserError(f"{path}: bad model configuration: {e}") from None


def check_regular_file(path: Path) -> None:
    """Refuse a path that is not a regular file (a directory, a FIFO, a device such as /dev/zero),
    before anything opens it: opening a FIFO blocks, reading a device may never end."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to /dev/zero is a device
    except FileNotFoundError:
        raise UserError(f"no {path.name} in {path.parent}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        raise UserError(f"{path} is {kind}, not a regular file")


def read_json_file(path: Path, limit: int = MAX_CONFIG_BYTES):
    """The JSON value in the regular file `path`, which must hold at most `limit` bytes."""
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise UserError(f"{path} is larger than {limit >> 20} MiB, too large for a JSON file of a checkpoint")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # bad syntax or encoding, a 5000-digit number, deep nesting
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in the checkpoint file `path` (read as read_json_file does), {} when there
    is no such file; UserError naming `what` (e.g. "image processor config") when it is not an object."""
    if not path.exists():
        return {}
    d = read_json_file(path)
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a valid {what}: not a JSON object")
    return d


def _read_pinpoints(value, tile: int) -> list[tuple[int, int]]:
    """image_grid_pinpoints as (height, width) pairs, each a multiple of the tile size."""
    if not isinstance(value, list) or not value:
        raise UserError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {_shown(value)}")
    out = []
    for p in value:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and 0 < v <= MAX_IMAGE for v in p)):
            raise UserError(f"image_grid_pinpoints entry {_shown(p)} is not a [height, width] pair of positive "
                            f"integers (at most {MAX_IMAGE})")
        if p[0] % tile or p[1] % tile:
            raise UserError(f"image_grid_pinpoints entry {list(p)} is not a multiple of the {tile}-pixel tile")
        out.append((p[0], p[1]))
    return out


# transformers' default image_token_index per model_type
_IMAGE_TOKEN = {"llava": 32000, "llava_next": 32000, "llava_onevision": 151646, "llava_next_video": 32001}


def _spatial_pool(d: dict, vision: VisionConfig, n_layers: int) -> tuple[str, int]:
    """LLaVA-NeXT-Video's spatial_pool_mode and spatial_pool_stride (transformers' defaults:
    average, 2), checked: a stride from 1 to the feature grid's side; a conv pool keeps the
    tower's width (its output goes to the projector), so it takes one feature layer."""
    mode = _choice(d.get("spatial_pool_mode", "average"), "spatial_pool_mode", ("average", "max", "conv"))
    stride = _check_int(d.get("spatial_pool_stride", 2), "spatial_pool_stride", hi=vision.grid)
    if mode == "conv":
        out = d.get("spatial_pool_out_channels", vision.hidden_size)
        if out != vision.hidden_size or n_layers != 1:
            raise UserError(f"spatial_pool_mode 'conv' needs one vision_feature_layer and spatial_pool_out_channels "
                            f"equal to vision_config.hidden_size ({vision.hidden_size}), as the projector reads it")
    return mode, stride


def _max_tiles(value) -> int:
    """LLaVA-OneVision's vision_aspect_ratio, "anyres_max_N" -> N: tile grids of more than about N
    tiles' features are scaled down to about N tiles' worth."""
    if not (isinstance(value, str) and value.startswith("anyres_max_") and value[len("anyres_max_"):].isdigit()
            and 0 < int(value[len("anyres_max_"):]) <= 1024):
        raise UserError(f"unsupported vision_aspect_ratio {_shown(value)}; expected anyres_max_N (N from 1 to 1024)")
    return int(value[len("anyres_max_"):])


# Integer sizes of each part and their upper bounds; all must be positive.
_VISION_SIZES = {"hidden_size": MAX_HIDDEN, "intermediate_size": MAX_INTERMEDIATE, "num_hidden_layers": MAX_LAYERS,
                 "num_attention_heads": MAX_HIDDEN, "num_channels": MAX_CHANNELS, "image_size": MAX_IMAGE,
                 "patch_size": MAX_IMAGE}
_TEXT_SIZES = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_HIDDEN, "intermediate_size": MAX_INTERMEDIATE,
               "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HIDDEN, "num_key_value_heads": MAX_HIDDEN,
               "head_dim": MAX_HIDDEN, "max_position_embeddings": MAX_POSITIONS, "sliding_window": MAX_POSITIONS}
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")  # None: derived, or no window


def _shown(value) -> str:
    """value as config.json spells it (true, "64", NaN), cut short: a message stays one short line
    whatever the file holds."""
    try:
        r = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no size, nor is 64.0


def _check_int(value, name: str, hi: int | None = None, lo: int | None = 1) -> int:
    """value, an integer in [lo, hi] (None: no bound)."""
    if not (_is_int(value) and (lo is None or value >= lo)):
        kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}[lo]
        raise UserError(f"{name} must be {kind}, got {_shown(value)}")
    if hi is not None and value > hi:
        raise UserError(f"{name} must be at most {hi}, got {_shown(value)}")
    return value


def _check_sizes(cfg, bounds: dict[str, int], where: str) -> None:
    """Each field of `bounds` a positive integer up to its bound (those of _OPTIONAL_SIZES may be None)."""
    for name, hi in bounds.items():
        value = getattr(cfg, name)
        if not (value is None and name in _OPTIONAL_SIZES):
            _check_int(value, f"{where}.{name}", hi)


def _check_multiple(cfg, whole: str, part: str, where: str) -> None:
    """cfg.<whole> split evenly into cfg.<part>-sized pieces (both already checked positive)."""
    if getattr(cfg, whole) % getattr(cfg, part):
        raise UserError(f"{where}.{whole} ({getattr(cfg, whole)}) must be a multiple of {where}.{part} "
                        f"({getattr(cfg, part)})")


def _positive_float(value, name: str) -> float:
    """value as a float, finite and > 0 (NaN and Infinity parse from JSON, so they are refused here)."""
    if not ((_is_int(value) or isinstance(value, float)) and 0 < value <= sys.float_info.max):
        raise UserError(f"{name} must be a positive finite number, got {_shown(value)}")
    return float(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {_shown(value)}")
    return value


def _choice(value, name: str, choices) -> str:
    if not (isinstance(value, str) and value in choices):
        raise UserError(f"{name} must be one of {', '.join(sorted(choices))}, got {_shown(value)}")
    return value


def _section(value, name: str) -> dict:
    """A nested object of config.json (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{name} must be a JSON object, got {_shown(value)}")
    return value


def _token_ids(value, name: str) -> list[int]:
    """eos_token_id: null, one id or a list of ids -> a list."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for i in ids:
        _check_int(i, name, lo=None)
    return ids


def _feature_layers(value, num_layers: int) -> list[int]:
    """vision_feature_layer (an index or a non-empty list of them, negative from the end) -> a list."""
    layers = value if isinstance(value, list) else [value]
    if not layers:
        raise UserError("vision_feature_layer must be an integer or a non-empty list of integers, got []")
    for idx in layers:
        _check_int(idx, "vision_feature_layer", lo=None)
        if not -(num_layers + 1) <= idx <= num_layers:
            raise UserError(f"vision_feature_layer {idx} is out of range for a {num_layers}-layer vision tower")
    return layers


def _pick(cls, d: dict, exclude: set[str] = frozenset()) -> dict:
    names = {f for f in cls.__dataclass_fields__ if f not in exclude}
    return {k: v for k, v in d.items() if k in names}


def to_hf_dict(cfg: LlavaConfig) -> dict:
    """A transformers-style LLaVA config.json for `cfg` (vision tower with all its layers)."""
    if cfg.is_onevision:
        raise UserError("writing LLaVA-OneVision checkpoints is not supported yet")
    v, t = cfg.vision, cfg.text
    layers = cfg.vision_feature_layers
    next_keys = {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]} if cfg.is_next else {}
    if cfg.is_next_video:
        next_keys.update(video_token_index=cfg.video_token_index, spatial_pool_mode=cfg.spatial_pool_mode,
                         spatial_pool_stride=cfg.spatial_pool_stride)
    kind = "LlavaNextVideo" if cfg.is_next_video else "LlavaNext" if cfg.is_next else "Llava"
    return {
        "architectures": [f"{kind}ForConditionalGeneration"],
        "model_type": cfg.model_type if cfg.is_next_video else "llava_next" if cfg.is_next else "llava",
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
