"""Load a Hugging Face LLaVA checkpoint (safetensors, single file or sharded) into our modules.

Two key layouts exist in the wild: the original one (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`) and the one that
transformers >= 4.52 saves (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`). Both map onto the same module names here.
LLaVA-OneVision checkpoints (SigLIP tower, Qwen2 decoder) use the same prefixes; their SigLIP
post-layernorm and attention-pooling head are never read. LLaVA-NeXT-Video checkpoints add
`vision_resampler.pool.*` (or `model.vision_resampler.pool.*`) when their frames are pooled by a conv.

Loading never allocates for a checkpoint that cannot load: the config is validated (config.py),
the model is built on the `meta` device (shapes only), its size checked against the free memory
of the target device, and the safetensors headers against its shapes (every tensor expected, of
its shape, in a float dtype), all before the model is allocated, once, on the target device in
the target dtype. Each checkpoint tensor is then read on its own, copied into place and checked
finite, so memory never holds a second full copy of the weights. Pickled checkpoints (`.bin`,
`.pt`) are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LlavaConfig, check_regular_file, read_json_file, to_hf_dict
from .errors import UserError
from .models.llava import LlavaModel
from .models import build_model

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
    ("model.vision_resampler.", "vision_resampler."),  # LLaVA-NeXT-Video's conv pooling
    ("vision_resampler.", "vision_resampler."),
]

# Tensors that checkpoints carry but LLaVA never reads.
_UNUSED = [
    re.compile(r"vision_tower\.post_layernorm\..*"),
    re.compile(r"vision_tower\.head\..*"),  # SigLIP's attention-pooling head (LLaVA-OneVision reads patches)
    re.compile(r"vision_tower\.embeddings\.position_ids"),
    re.compile(r".*rotary_emb\.inv_freq"),
]

# fused module -> the checkpoint projections stacked into it, in order
_FUSED = {
    "self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The safetensors dtypes a weight may be stored in (cast to the model's dtype while loading).
_WEIGHT_DTYPES = ("F32", "F16", "BF16")

_MAX_INDEX_BYTES = 64 << 20  # model.safetensors.index.json: ~100 bytes per tensor name


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else the CPU; unknown or absent devices are user errors."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {str(device)!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
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
        weight_map = read_json_file(index, _MAX_INDEX_BYTES)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map)")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise UserError(f"shard {f.name} named in {index.name} is missing from {path}")
            check_regular_file(f)
        return files
    if single.exists():
        check_regular_file(single)
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


def _open(file: Path):
    """A safetensors reader of `file` (parses its header only; tensors are read on request)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, ValueError) as e:
        raise UserError(f"cannot read {file}: not a valid safetensors file ({e})") from None
    except (OSError, RuntimeError) as e:  # e.g. "unable to mmap": a file larger than memory
        raise UserError(f"cannot read {file}: {e}") from None


def _plan(path: Path, files: list[Path], model: LlavaModel) -> list[tuple[Path, list[tuple[str, str]]]]:
    """From the safetensors headers alone (no tensor data read): per file, the (checkpoint key, our
    name) pairs to load. Unexpected, mis-shaped, non-float and missing tensors are refused here,
    before the model is allocated. `model` may live on the meta device."""
    targets = _targets(model)
    plan, loaded = [], set()
    for file in files:
        pairs = []
        with _open(file) as reader:
            for key in reader.keys():
                name = _our_name(key)
                if name is not None and name not in targets and _is_unused(name, model):
                    continue
                if name is None or name not in targets:
                    raise UserError(f"unexpected tensor {key!r} in {file}: no such weight in a "
                                    f"LLaVA model with this config.json")
                param, rows = targets[name]
                expected = list(param.shape if rows is None else param[rows].shape)
                header = reader.get_slice(key)
                if header.get_shape() != expected:
                    raise UserError(f"tensor {key!r} in {file} has shape {header.get_shape()}, "
                                    f"the config expects {expected}")
                if header.get_dtype() not in _WEIGHT_DTYPES:
                    raise UserError(f"tensor {key!r} in {file} has dtype {header.get_dtype()}; LLaVA weights "
                                    f"must be floats ({', '.join(_WEIGHT_DTYPES)})")
                pairs.append((key, name))
                loaded.add(name)
        plan.append((file, pairs))
    missing = sorted(set(targets) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {path} lacks tensor {missing[0]!r}{more}")
    return plan


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`, None where unknown: CUDA's free memory; on the CPU
    /proc/meminfo's MemAvailable (else sysconf's available pages), capped by a cgroup v2 memory
    limit (a container's)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not free:
        try:
            free.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        free.append(int(Path("/sys/fs/cgroup/memory.max").read_text()))  # "max" (no limit) fails int()
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def _check_fits(model: LlavaModel, dtype: torch.dtype, device: torch.device, config: Path) -> None:
    """Refuse a model (on meta) whose weights alone exceed the free memory of `device`."""
    need = sum(p.numel() for p in model.parameters()) * dtype.itemsize  # parameters(): a tied head once
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"{config}: this model needs {need / 1e9:,.1f} GB for its weights in "
                        f"{str(dtype).removeprefix('torch.')}, but {device} has only {free / 1e9:,.1f} GB free")


def _check_finite(dest: torch.Tensor, source: torch.Tensor, key: str, file: Path) -> None:
    """NaN or infinite weights (in the file, or after the cast to the model's dtype) would make
    every answer garbage, or fail much later in sampling."""
    # A NaN or an infinity anywhere makes the sum NaN or infinite: one fast reduction (~10x faster
    # than isfinite on the CPU) clears almost every tensor; the exact check runs only if it does
    # not (a sum can also overflow, e.g. in float16).
    if bool(torch.isfinite(dest.sum())) or bool(torch.isfinite(dest).all()):
        return
    if bool(torch.isfinite(source).all()):
        raise UserError(f"tensor {key!r} in {file} holds values too large for "
                        f"{str(dest.dtype).removeprefix('torch.')}; load it in float32 or bfloat16")
    raise UserError(f"tensor {key!r} in {file} holds NaN or infinite values")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> LlavaModel:
    path = Path(path).expanduser()
    files = checkpoint_files(path)
    cfg = LlavaConfig.from_file(path / "config.json")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = build_model(cfg)  # shapes only, no memory: sizes bounded by the config's validation
    _check_fits(model, dtype, device, path / "config.json")
    plan = _plan(path, files, model)
    try:
        model = model.to(dtype).to_empty(device=device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot allocate the model on {device}: {reason}") from None
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    targets = _targets(model)
    for file, pairs in plan:
        with _open(file) as reader:
            for key, name in pairs:
                param, rows = targets[name]
                dest = param.data if rows is None else param.data[rows]
                try:
                    tensor = reader.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"cannot read tensor {key!r} from {file}: {e}") from None
                with torch.no_grad():
                    dest.copy_(tensor)
                _check_finite(dest, tensor, key, file)
    return model.eval()


# our module prefix -> the original llava-hf checkpoint prefix (what save_model writes)
_SAVE_PREFIXES = [
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
    ("vision_resampler.", "model.vision_resampler."),  # LLaVA-NeXT-Video's conv: where transformers reads it
]


def save_model(model: LlavaModel, path: str | Path) -> Path:
    """Write `model` as a Hugging Face LLaVA checkpoint (config.json + model.safetensors, the
    original key layout) that transformers' LlavaForConditionalGeneration (LlavaNext... for a
    LLaVA-NeXT model, LlavaNextVideo... for LLaVA-NeXT-Video) loads as it is."""
    if model.cfg.is_onevision:
        raise UserError("writing LLaVA-OneVision checkpoints is not supported yet")
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
