"""Visual token reduction: methods (one module each), their registry and specs, and the runtime
that applies them at the model's hook points."""

# registration order is the listing order
from . import random, pool, fastervlm, visionzip, hired, globalcom2, divprune, vispruner, cdpruner, mmtok  # noqa: F401,I001
from . import rebalance, flowcut, pitome, visiondrop  # noqa: F401,I001
from . import fastv, pdrop, sparsevlm, dart  # noqa: F401,I001
from .base import LayerContext, Method, Selection, VisionContext
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .flowcut import FlowCut
from .fastv import FastV
from .globalcom2 import GlobalCom2
from .hired import HiRED
from .mmtok import MMTok
from .pdrop import PDrop
from .pitome import PiToMe
from .pool import Pool
from .random import Random
from .rebalance import Rebalance
from .registry import METHODS, describe, parse_list, parse_spec
from .runtime import Reduction
from .sparsevlm import SparseVLM
from .visiondrop import VisionDrop
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = ["METHODS", "CDPruner", "DART", "DivPrune", "FastV", "FasterVLM", "FlowCut", "GlobalCom2", "HiRED",
           "LayerContext", "MMTok", "Method", "PDrop", "PiToMe", "Pool", "Random", "Rebalance", "Reduction", "Selection",
           "SparseVLM", "VisPruner", "VisionContext", "VisionDrop", "VisionZip", "describe", "parse_list", "parse_spec"]
