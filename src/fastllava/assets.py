"""Where the files shipped inside the package live."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"


def default_model_dir() -> Path:
    """The embedded default model's checkpoint directory."""
    if not (DEFAULT_MODEL / "config.json").exists():
        raise UserError("this build of fastllava carries no embedded default model; pass --model DIR")
    return DEFAULT_MODEL
