"""Visual token reduction: methods (one module each), their registry and specs, and the runtime
that applies them at the model's hook points."""

# registration order is the listing order
from . import random, pool, fastervlm, visionzip, hired, globalcom2, fastv, pdrop, sparsevlm, dart  # noqa: F401,I001
from .base import LayerContext, Method, Selection, VisionContext
from .dart import DART
from .fastervlm import FasterVLM
from .fastv import FastV
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .pdrop import PDrop
from .pool import Pool
from .random import Random
from .registry import METHODS, describe, parse_list, parse_spec
from .runtime import Reduction
from .sparsevlm import SparseVLM
from .visionzip import VisionZip

__all__ = ["METHODS", "DART", "FastV", "FasterVLM", "GlobalCom2", "HiRED", "LayerContext", "Method", "PDrop", "Pool", "Random",
           "Reduction", "Selection", "SparseVLM", "VisionContext", "VisionZip", "describe", "parse_list",
           "parse_spec"]
