"""fastllava: a fast, compact engine for LLaVA-family vision-language models."""

from .engine import Llava, Result, load
from .errors import UserError

__all__ = ["load", "Llava", "Result", "UserError"]
__version__ = "0.1.0"
