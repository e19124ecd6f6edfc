"""Parsing of the quantization specs users type: `--kv-cache` / `kv_cache=` and `--weights` /
`weights=`. A bad spec is a one-line UserError that lists what is allowed."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..specs import parse_options, split_spec

KV_HELP = ("fp, kivi[:bits=2|4,group=N,residual=N] (default bits=4,group=32,residual=128) or "
           "vidkv[:group=N,residual=N,high=F,salient=F] (default group=32,residual=128,high=0.5,salient=0)")
WEIGHTS_HELP = ("fp, int8[:vision=0|1] or int4[:group=N,vision=0|1] (default group=128; vision=1 also "
                "quantizes the vision tower and projector)")


@dataclass(frozen=True)
class KVSpec:
    method: str  # "kivi" | "vidkv"
    bits: int = 4  # kivi only
    group: int = 32
    residual: int = 128
    high: float = 0.5  # vidkv: fraction of key channels at 2 bits
    salient: float = 0.0  # vidkv: fraction of a prompt's visual tokens whose values also keep 2 bits

    def __str__(self) -> str:
        if self.method == "kivi":
            return f"kivi:bits={self.bits},group={self.group},residual={self.residual}"
        return f"vidkv:group={self.group},residual={self.residual},high={self.high:g},salient={self.salient:g}"


@dataclass(frozen=True)
class WeightSpec:
    bits: int  # 8 | 4
    group: int = 128  # int4 only: input channels per scale
    vision: bool = False  # also quantize the vision tower and the projector

    def __str__(self) -> str:
        text = "int8" if self.bits == 8 else f"int4:group={self.group}"
        return text + (("," if self.bits == 4 else ":") + "vision=1" if self.vision else "")


def _options(text: str, allowed: dict[str, type], what: str, help_text: str) -> dict:
    def message(problem, item, key, value):
        if problem == "duplicate":
            return f"bad {what}: {key!r} is given twice; allowed: {help_text}"
        bad = "option" if problem == "unknown" or value is None else "value"  # a wrong name or no '='
        return f"bad {what} {bad} {item!r}; allowed: {help_text}"
    return parse_options(text, allowed, message)


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _kind(spec, what: str, help_text: str) -> tuple[str, str]:
    """"name:options" -> (lower-case name, options)."""
    if not isinstance(spec, str):
        raise UserError(f"{what} must be a string, got {type(spec).__name__}; choose {help_text}")
    kind, rest = split_spec(spec)
    return kind.lower(), rest


def parse_kv_cache(spec: str | KVSpec | None) -> KVSpec | None:
    """None for the full-precision cache ("fp" or None), else a validated KVSpec."""
    if spec is None or isinstance(spec, KVSpec):
        return spec
    method, rest = _kind(spec, "kv_cache", KV_HELP)
    if method == "fp" and not rest:
        return None
    if method == "kivi":
        kv = KVSpec("kivi", **_options(rest, {"bits": int, "group": int, "residual": int}, "kv_cache", KV_HELP))
    elif method == "vidkv":
        allowed = {"group": int, "residual": int, "high": float, "salient": float}
        kv = KVSpec("vidkv", **_options(rest, allowed, "kv_cache", KV_HELP))
    else:
        raise UserError(f"unknown kv_cache {spec!r}; choose {KV_HELP}")
    problem = None
    if kv.bits not in (2, 4):
        problem = f"bits must be 2 or 4, got {kv.bits}"
    elif kv.group < 1:
        problem = f"group must be positive, got {kv.group}"
    elif kv.residual < 0 or kv.residual % kv.group:
        problem = f"residual must be a non-negative multiple of group ({kv.group}), got {kv.residual}"
    elif not 0 < kv.high < 1:
        problem = f"high must be in (0, 1), got {kv.high:g}"
    elif not 0 <= kv.salient <= 1:
        problem = f"salient must be in [0, 1], got {kv.salient:g}"
    if problem:
        raise UserError(f"bad kv_cache {spec!r}: {problem}; allowed: {KV_HELP}")
    return kv


def parse_weights(spec: str | WeightSpec | None) -> WeightSpec | None:
    """None for full-precision weights ("fp" or None), else a validated WeightSpec."""
    if spec is None or isinstance(spec, WeightSpec):
        return spec
    kind, rest = _kind(spec, "weights", WEIGHTS_HELP)
    if kind == "fp" and not rest:
        return None
    if kind not in ("int8", "int4"):
        raise UserError(f"unknown weights {spec!r}; choose {WEIGHTS_HELP}")
    allowed = {"vision": _flag} | ({"group": int} if kind == "int4" else {})
    ws = WeightSpec(int(kind[3:]), **_options(rest, allowed, "weights", WEIGHTS_HELP))
    if ws.group < 2 or ws.group % 2:
        raise UserError(f"bad weights {spec!r}: group must be an even number >= 2, got {ws.group}; allowed: {WEIGHTS_HELP}")
    return ws
