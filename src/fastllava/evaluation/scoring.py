"""Exact-match scoring after normalization (case, punctuation, whitespace, number words)."""

from __future__ import annotations

import re
import string

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
