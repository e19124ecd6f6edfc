"""Where the files shipped inside the package live."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EMBEDDED = {  # names `load` and `--model` accept for the models shipped in the package
    "default": DEFAULT_MODEL,  # LLaVA-1.5 architecture, shapes benchmark
    "default-next": ASSETS / "default_next_model",  # LLaVA-NeXT (AnyRes), hires shapes variant
}


def default_model_dir(name: str = "default") -> Path:
    """The checkpoint directory of an embedded model (see EMBEDDED)."""
    path = EMBEDDED[name]
    if not (path / "config.json").exists():
        raise UserError(f"this build of fastllava carries no embedded {name!r} model; pass --model DIR")
    return path


def resolve_model_path(path: str | Path | None) -> Path:
    """A checkpoint directory from what a user passed: None is the embedded default model, a name
    of EMBEDDED that is not an existing directory is that embedded model, anything else a path."""
    if path is None:
        return default_model_dir()
    if str(path) in EMBEDDED and not Path(path).expanduser().is_dir():
        return default_model_dir(str(path))
    return Path(path).expanduser()
