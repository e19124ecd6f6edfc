"""Synthetic shapes scenes, question sets with one-word answers, and model evaluation on them."""

from .dataset import Dataset, Sample, generate_dataset, load_dataset
from .questions import ANSWER_SUFFIX, FAMILIES, STRATEGIES, VOCABULARY, prompt
from .runner import evaluate
from .scenes import Scene, SceneObject, caption, random_scene, render
from .scoring import is_correct, normalize

__all__ = [
    "ANSWER_SUFFIX", "FAMILIES", "STRATEGIES", "VOCABULARY", "Dataset", "Sample", "Scene", "SceneObject",
    "caption", "evaluate", "generate_dataset", "is_correct", "load_dataset", "normalize", "prompt",
    "random_scene", "render",
]
