"""Load a Hugging Face LLaVA checkpoint (safetensors, single file or sharded) into our modules.

Two key layouts exist in the wild: the original one (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`) and the one that
transformers >= 4.52 saves (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`). Both map onto the same module names here.

The model is first built on the `meta` device, then allocated once on the target device in the
target dtype; each checkpoint tensor is read on its own and copied into place, so memory never
holds a second full copy of the weights. Pickled checkpoints (`.bin`, `.pt`) are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LlavaConfig, to_hf_dict
from .errors import UserError
from .models.llava import LlavaModel
from .models.llava_next import build_model

# checkpoint prefix -> our module prefix
_PREFIXES = [
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),  # transformers 5 saves the CLIP tower without `vision_model.`
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),  # LLaVA-NeXT
    ("image_newline", "image_newline"),
]

# Tensors that checkpoints carry but LLaVA never reads.
_UNUSED = [
    re.compile(r"vision_tower\.post_layernorm\..*"),
    re.compile(r"vision_tower\.embeddings\.position_ids"),
    re.compile(r".*rotary_emb\.inv_freq"),
]

# fused module -> the checkpoint projections stacked into it, in order
_FUSED = {
    "self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else the CPU; unknown or absent devices are user errors."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks float32 on the CPU and bfloat16 on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
    return names[dtype]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    if not path.exists():
        raise UserError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give the checkpoint directory that holds config.json")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise UserError(f"shard {f.name} named in {index.name} is missing from {path}")
        return files
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{path} holds only pickled weights ({', '.join(pickles[:3])}); fastllava never unpickles "
            "checkpoints: convert them to safetensors"
        )
    raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _our_name(key: str) -> str | None:
    for prefix, ours in _PREFIXES:
        if key.startswith(prefix):
            return (ours + key[len(prefix):]).replace("vision_tower.encoder.layers.", "vision_tower.layers.")
    return None


def _targets(model: LlavaModel) -> dict[str, tuple[torch.Tensor, slice | None]]:
    """Checkpoint-side names (after prefix mapping) -> (our parameter, row slice in it)."""
    targets = {}
    for name, param in model.named_parameters():
        fused = next((f for f in _FUSED if f".{f}." in name), None)
        if fused is None:
            targets[name] = (param, None)
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        start = 0
        for part, size in zip(_FUSED[fused], module.splits):
            targets[name.replace(fused, part)] = (param, slice(start, start + size))
            start += size
    return targets


def weights_by_key(model: LlavaModel) -> Callable[[str], torch.Tensor | None]:
    """A lookup from a checkpoint key (either layout) to the tensor of `model` holding it (a
    view into a fused projection where needed), or None for keys LLaVA never reads. Used to give
    another implementation (transformers, in `fastllava bench --compare hf`) the same weights."""
    targets = _targets(model)

    def lookup(key: str) -> torch.Tensor | None:
        name = _our_name(key)
        if name is None or name not in targets:
            return None
        param, rows = targets[name]
        return param.detach() if rows is None else param.detach()[rows]

    return lookup


def _is_unused(name: str, model: LlavaModel) -> bool:
    if any(p.fullmatch(name) for p in _UNUSED):
        return True
    if model.cfg.tie_word_embeddings and name == "lm_head.weight":
        return True
    m = re.match(r"vision_tower\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= len(model.vision_tower.layers)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> LlavaModel:
    path = Path(path).expanduser()
    files = checkpoint_files(path)
    cfg = LlavaConfig.from_file(path / "config.json")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    targets = _targets(model)
    loaded: set[str] = set()
    for file in files:
        try:
            reader = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {file}: not a valid safetensors file ({e})") from None
        with reader:
            for key in reader.keys():
                name = _our_name(key)
                if name is not None and name not in targets and _is_unused(name, model):
                    continue
                if name is None or name not in targets:
                    raise UserError(f"unexpected tensor {key!r} in {file.name}: no such weight in a "
                                    f"LLaVA model with this config.json")
                param, rows = targets[name]
                dest = param.data if rows is None else param.data[rows]
                try:
                    tensor = reader.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"cannot read tensor {key!r} from {file}: {e}") from None
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise UserError(f"tensor {key!r} in {file.name} has shape {list(tensor.shape)}, "
                                    f"the config expects {list(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {path} lacks tensor {missing[0]!r}{more}")
    return model.eval()


# our module prefix -> the original llava-hf checkpoint prefix (what save_model writes)
_SAVE_PREFIXES = [
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
]


def save_model(model: LlavaModel, path: str | Path) -> Path:
    """Write `model` as a Hugging Face LLaVA checkpoint (config.json + model.safetensors, the
    original key layout) that transformers' LlavaForConditionalGeneration (LlavaNext... for a
    LLaVA-NeXT model) loads as it is."""
    if len(model.vision_tower.layers) != model.cfg.vision.num_hidden_layers:
        raise UserError("save_model needs a vision tower with all its layers (use vision_feature_layer -1)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, (param, rows) in _targets(model).items():
        prefix, saved = next((p, s) for p, s in _SAVE_PREFIXES if name.startswith(p))
        tensor = param.detach() if rows is None else param.detach()[rows]
        state[saved + name[len(prefix):]] = tensor.to("cpu", torch.float32).contiguous()
    hidden = model.cfg.vision.hidden_size  # CLIP's post-layernorm, unused by LLaVA: identity
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(hidden)
    state["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(hidden)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(to_hf_dict(model.cfg), indent=2) + "\n")
    return path
