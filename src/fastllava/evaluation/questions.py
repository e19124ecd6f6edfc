"""Questions derived from a Scene so that answers are right by construction: six families with
one-word answers, and `describe`, whose answer lists every object.

Every object a question names is uniquely referable in its scene ("the red circle" only when
there is exactly one red circle). The words that can appear are fixed: see VOCABULARY (and
LONG_ANSWER_WORDS, which describe adds).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from math import hypot

import numpy as np

from .scenes import BACKGROUND_WORDS, COLORS, MAX_COUNT, PLURALS, SHAPES, SIZES, Scene, SceneObject

FAMILIES = ("color", "shape", "count", "exist", "position", "relation")  # one-word answers (the default set)
LONG_FAMILIES = ("describe",)  # answers of many words, asked only when chosen (`--families`)
ALL_FAMILIES = FAMILIES + LONG_FAMILIES
DESCRIBE_QUESTION = "List the objects from left to right."
# words only describe uses, kept apart from VOCABULARY so that a word tokenizer built from both
# gives every earlier word its old id (see tokenizer.default_words)
LONG_ANSWER_WORDS = ("list", "from", "and")
STRATEGIES = ("random", "popular", "adversarial")  # how "exist" negatives are drawn (POPE)
ANSWER_SUFFIX = "Answer with one word."
PUNCTUATION = ("?", ".", ",", ":")
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NEAREST_MARGIN = 1.2  # the second-nearest object must be at least this much farther
# describe: objects whose centres are closer than this along x (in tiles: a fraction of a default
# image's width) are side by side, listed in either order (10 px of a 336-px tile, 3 of a 96-px one)
ORDER_MARGIN = 0.03
MAX_ACCEPTED = 120  # describe: at most this many other accepted orders are listed per question


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    family: str
    strategy: str | None = None  # "exist" only
    accepted: tuple[str, ...] = ()  # other answers scored correct (describe: side-by-side objects swapped)


def prompt(question: str, family: str | None = None) -> str:
    """What the model is asked: the question and the one-word instruction (a `describe` question
    alone). `fastllava data shapes` writes it as each questions.jsonl line's "prompt", which eval
    (and the lmms-eval plugin, and any OpenAI client) asks as it is, so that every client asks the
    same text."""
    return question if family in LONG_FAMILIES else f"{question} {ANSWER_SUFFIX}"


def _words(*texts: str) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())}


VOCABULARY: tuple[str, ...] = tuple(sorted(
    _words("what color is the shape object nearest to how many are there objects a which side of on",
           "left right above below yes no with background at top bottom center", ANSWER_SUFFIX)
    | set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(SIZES) | set(BACKGROUND_WORDS.values())
    | {str(i) for i in range(MAX_COUNT + 1)}
))


def referable(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names unambiguously."""
    pairs = Counter((o.color, o.shape) for o in scene.objects)
    return [o for o in scene.objects if pairs[o.color, o.shape] == 1]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))] if items else None


def ask_color(scene: Scene, rng: np.random.Generator) -> Question | None:
    shapes = Counter(o.shape for o in scene.objects)
    obj = _pick(rng, [o for o in scene.objects if shapes[o.shape] == 1])
    return obj and Question(f"What color is the {obj.shape}?", obj.color, "color")


def ask_shape(scene: Scene, rng: np.random.Generator) -> Question | None:
    colors = Counter(o.color for o in scene.objects)
    obj = _pick(rng, [o for o in scene.objects if colors[o.color] == 1])
    return obj and Question(f"What shape is the {obj.color} object?", obj.shape, "shape")


def ask_count(scene: Scene, rng: np.random.Generator, zero_rate: float = 0.15) -> Question | None:
    by_shape = rng.random() < 0.5
    values = [o.shape if by_shape else o.color for o in scene.objects]
    universe = SHAPES if by_shape else tuple(COLORS)
    absent = [v for v in universe if v not in values]
    if absent and rng.random() < zero_rate:
        target = _pick(rng, absent)
    else:
        target = _pick(rng, values)  # weighted by how many there are, so counts above 1 are common
    n = values.count(target)
    text = f"How many {PLURALS[target]} are there?" if by_shape else f"How many {target} objects are there?"
    return Question(text, str(n), "count")


def all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def ask_exist(scene: Scene, rng: np.random.Generator, answer: str, strategy: str,
              popular: list[tuple[str, str]] = ()) -> Question | None:
    """ "Is there a <colour> <shape>?" with the given answer; a "no" draws its absent object by
    `strategy`: random, popular (most frequent in the dataset, `popular` sorted by frequency),
    or adversarial (shares a colour or a shape with a present object)."""
    present = {(o.color, o.shape) for o in scene.objects}
    if answer == "yes":
        pair = _pick(rng, sorted(present, key=all_pairs().index))
    else:
        absent = [p for p in all_pairs() if p not in present]
        if strategy == "random":
            pair = _pick(rng, absent)
        elif strategy == "popular":
            pair = _pick(rng, [p for p in popular if p not in present][:3])
        elif strategy == "adversarial":
            colors, shapes = {c for c, _ in present}, {s for _, s in present}
            pair = _pick(rng, [p for p in absent if p[0] in colors or p[1] in shapes])
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
    return pair and Question(f"Is there a {pair[0]} {pair[1]}?", answer, "exist", strategy)


def directions(a: SceneObject, b: SceneObject) -> list[str]:
    """Where a is relative to b, along each axis where they are clearly apart (centre distance
    along the axis larger than the sum of the radii). Image y grows downwards."""
    gap = a.radius + b.radius
    out = []
    if abs(a.x - b.x) > gap:
        out.append("left" if a.x < b.x else "right")
    if abs(a.y - b.y) > gap:
        out.append("above" if a.y < b.y else "below")
    return out


def ask_position(scene: Scene, rng: np.random.Generator) -> Question | None:
    objs = referable(scene)
    pairs = [(a, b) for a in objs for b in objs if a is not b and directions(a, b)]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    where = _pick(rng, directions(a, b))
    if where in ("left", "right") and rng.random() < 1 / 3:
        return Question(f"Which side of the {b.name} is the {a.name} on?", where, "position")
    truth = rng.random() < 0.5
    said = where if truth else OPPOSITE[where]
    return Question(f"Is the {a.name} {RELATIONS[said]} the {b.name}?", "yes" if truth else "no", "position")


def nearest(scene: Scene, anchor: SceneObject) -> SceneObject | None:
    """The object nearest to `anchor` (centre distance), or None if not clearly the nearest."""
    others = sorted((hypot(o.x - anchor.x, o.y - anchor.y), i) for i, o in enumerate(scene.objects)
                    if o is not anchor)
    if not others or (len(others) > 1 and others[1][0] < NEAREST_MARGIN * others[0][0]):
        return None
    return scene.objects[others[0][1]]


def ask_relation(scene: Scene, rng: np.random.Generator) -> Question | None:
    anchors = [(a, n) for a in referable(scene) if (n := nearest(scene, a)) is not None]
    if not anchors:
        return None
    a, n = anchors[int(rng.integers(len(anchors)))]
    if rng.random() < 0.5:
        return Question(f"What color is the object nearest to the {a.name}?", n.color, "relation")
    return Question(f"What shape is the object nearest to the {a.name}?", n.shape, "relation")


def left_to_right(scene: Scene) -> list[int]:
    """The indices of the scene's objects in the order describe lists them: by centre from left to
    right, ties top to bottom."""
    return sorted(range(len(scene.objects)), key=lambda i: (scene.objects[i].x, scene.objects[i].y))


def accepted_orders(scene: Scene, limit: int = MAX_ACCEPTED) -> list[list[int]]:
    """Every order of the objects that never lists one before an object clearly to its left (centres
    at least ORDER_MARGIN tiles apart along x), left_to_right's first, at most 1 + `limit` of them.
    Objects nearly above one another have no visible left-to-right order: either is right."""
    objs = scene.objects
    orders: list[list[int]] = []

    def extend(prefix: list[int], rest: list[int]) -> None:
        if len(orders) > limit:
            return
        if not rest:
            orders.append(prefix)
            return
        for i in rest:  # i may come next if nothing left is clearly to its left
            if all(objs[i].x - objs[j].x < ORDER_MARGIN for j in rest if j != i):
                extend(prefix + [i], [j for j in rest if j != i])

    extend([], left_to_right(scene))
    return orders[:1 + limit]


def _listed(objects: list[SceneObject]) -> str:
    """ "a small red circle, a large blue star and a small green square" """
    parts = [f"a {o.size} {o.color} {o.shape}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene) -> str:
    """Every object from left to right (left_to_right), in one fixed form:
    "a small red circle, a large blue star and a small green square"."""
    return _listed([scene.objects[i] for i in left_to_right(scene)])


def ask_describe(scene: Scene, rng: np.random.Generator) -> Question:
    """The answer is describe(scene) (accepted_orders' first); its other orders are accepted too."""
    answer, *others = dict.fromkeys(_listed([scene.objects[i] for i in order]) for order in accepted_orders(scene))
    return Question(DESCRIBE_QUESTION, answer, "describe", accepted=tuple(others))


ASK = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position,
       "relation": ask_relation}  # one-word families; "exist" needs more arguments: ask_exist
ASK_LONG = {"describe": ask_describe}
