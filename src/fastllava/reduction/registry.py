"""Method specs `NAME[:key=value,...]` -> typed method objects, and the list of methods."""

from __future__ import annotations

from dataclasses import fields

from ..errors import UserError
from ..specs import finite_float, int64, parse_options, split_spec
from .base import Method, TowerMethod, field_default

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _kind(f) -> str:
    """'int', 'float', 'str' or 'ints' (a dash-separated list) from a dataclass field's annotation."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return "ints" if t.startswith("list") or t.startswith("tuple") else t


# the converter of each kind (the other kinds: str)
_CONVERT = {"int": int64, "float": finite_float, "ints": lambda text: [int64(v) for v in text.split("-")]}
_WANT = {"int": "an integer in [-2**63, 2**63)", "float": "a finite number",
         "ints": "integers in [-2**63, 2**63) joined by '-', e.g. 8-16-24"}


def params(cls: type[Method]) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter of a method class."""
    return [(f.name, _kind(f), field_default(f)) for f in fields(cls)]


def parse_spec(spec: str | Method) -> Method:
    """'visionzip:keep=64' -> VisionZip(keep=64). A Method passes through unchanged."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"a reduction spec is NAME[:key=value,...]; methods: {', '.join(METHODS)}")
    name, rest = split_spec(spec)
    cls = METHODS.get(name)
    if cls is None:
        raise UserError(f"unknown reduction method {name!r}; methods: {', '.join(METHODS)}")
    kinds = {n: k for n, k, _ in params(cls)}

    def message(problem, item, key, value):
        if problem == "unknown":
            return f"{name}: unknown parameter {key!r}; parameters: {', '.join(kinds)}"
        if problem == "missing":
            return f"{name}: parameter {key!r} needs a value ({key}=...)"
        if problem == "duplicate":
            return f"{name}: parameter {key!r} is given twice"
        return f"{name}: {key}={value!r} is not {_WANT[kinds[key]]}"
    return cls(**parse_options(rest, {n: _CONVERT.get(k, str) for n, k in kinds.items()}, message))


def parse_list(text: str) -> list[Method]:
    """Several specs separated by ';' or by ',' before a method name: 'fastv,visionzip:keep=64'."""
    parts: list[str] = []
    for piece in text.replace(";", ",").split(","):
        piece = piece.strip()
        if not piece:
            continue
        if parts and "=" in piece and ":" not in piece and piece.split("=")[0].strip() not in METHODS:
            parts[-1] += ("," if ":" in parts[-1] else ":") + piece  # a parameter of the previous method
        else:
            parts.append(piece)
    if not parts:
        raise UserError(f"no reduction method given; methods: {', '.join(METHODS)}")
    return [parse_spec(p) for p in parts]


def describe() -> str:
    """The `fastllava methods` listing."""
    lines = []
    for name, cls in METHODS.items():
        args = ", ".join(f"{n}={('-'.join(map(str, d)) or cls.empty_lists.get(n, 'auto')) if isinstance(d, list) else d}"
                         for n, _, d in params(cls))
        where = "in the ViT" if issubclass(cls, TowerMethod) else "before the LLM" if cls.where == "vision" else "inside the LLM"
        only = {"single": "LLaVA-1.5 only; ", "tiled": "LLaVA-NeXT only; "}.get(cls.images, "")
        lines.append(f"{name:<10} {where:<15} {args}\n{'':<10} {only}{cls.paper}")
    return "\n".join(lines)
