"""Exact-match scoring after normalization (case, punctuation, whitespace, number words)."""

from __future__ import annotations

import re
import string
from collections import Counter

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed, number words as digits."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def answer_prior(samples) -> float:
    """Accuracy of the best image-blind guess on `samples` (objects with .family and .answer):
    the most frequent answer of each family in this very set."""
    hits = sum(Counter(s.answer for s in samples if s.family == f).most_common(1)[0][1]
               for f in {s.family for s in samples})
    return hits / len(samples) if samples else 0.0
