"""Exact-match scoring after normalization (case, punctuation, whitespace, number words), and
object-level F1 for answers that list objects (the `describe` family)."""

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


def is_correct(prediction: str, answer: str, accepted: tuple[str, ...] | list[str] = ()) -> bool:
    """The prediction is the answer or one of the `accepted` others, after normalization."""
    said = normalize(prediction)
    return said == normalize(answer) or any(said == normalize(a) for a in accepted)


_OBJECT = re.compile(r"\b(small|large) (\w+) (\w+)\b")


def objects(text: str) -> Counter:
    """The (size, color, shape) triples an answer names ("a small red circle, ...")."""
    return Counter(_OBJECT.findall(normalize(text)))


def object_f1(prediction: str, answer: str) -> float:
    """F1 of the objects a prediction names against the answer's (as multisets; order ignored)."""
    said, truth = objects(prediction), objects(answer)
    hits = sum((said & truth).values())
    if not hits:
        return float(not said and not truth)
    precision, recall = hits / sum(said.values()), hits / sum(truth.values())
    return 2 * precision * recall / (precision + recall)


def accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def answer_prior(samples) -> float:
    """Accuracy of the best image-blind guess on `samples` (objects with .family and .answer):
    the most frequent answer of each family in this very set."""
    hits = sum(Counter(s.answer for s in samples if s.family == f).most_common(1)[0][1]
               for f in {s.family for s in samples})
    return hits / len(samples) if samples else 0.0
