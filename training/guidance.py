"""Dense auxiliary targets that speed up training of the embedded model.

The embedded model's vision tower starts from random weights (real LLaVA starts from a
pretrained CLIP). An answer gives it a weak, sparse signal; a per-patch label gives it 576 dense
ones per image. For every patch of the grid we know from the scene what covers its centre: the
shape, the colour and the size of the object there (or background), and whether the object's
centre lies in this patch (so that objects can be counted). A linear head on the features that
LLaVA reads predicts them; the head is used in training only and is no part of the saved model
(the trainer keeps it at trainer.heads_path).

The language model must also learn where to look: a question about "the red object" is answered
from the few patches of that object among 576. `looked_at` reads off the scene which objects a
question points at; `Guidance` pulls attention heads, at the position that predicts the answer,
onto their patches (`guide_loss`) and asks, through `ObjectProbe`, that their shape, colour and
grid cell be linearly readable there, and for two named objects, on which side of the second the
first lies (`relative_direction`). A yes/no position question ("Is the red circle left of the
blue square?") also needs the side it asks about at the answer: another head is pulled onto that
word and a probe asks that it be readable there (training-only losses; inference is unchanged).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from fastllava.evaluation.questions import directions, nearest
from fastllava.evaluation.scenes import COLORS, PLURALS, SHAPES, SIZES, Scene, draw_object

# label group -> number of classes (0 = background / no)
# and (row, col): the patch's own place on a CELLS x CELLS grid, so that the features keep where they are
CELLS = 12
GROUPS = {"shape": len(SHAPES) + 1, "color": len(COLORS) + 1, "size": len(SIZES) + 1, "center": 2,
          "row": CELLS, "col": CELLS}


def object_map(scene: Scene, size: int) -> np.ndarray:
    """[H, W] uint8 at `size` pixels per tile (the rendered image's shape): 1 + the index of the
    object drawn at each pixel, 0 on the background."""
    img = Image.new("L", (scene.canvas[1] * size, scene.canvas[0] * size), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        draw_object(draw, obj, size, fill=i + 1)
    return np.asarray(img)


WHOLE = [(0.0, 0.0, 1.0, 1.0)]  # one piece, the whole image (LLaVA-1.5); see anyres.piece_boxes


def patch_centres(boxes: list[tuple[float, float, float, float]], grid: int) -> np.ndarray:
    """[K, grid * grid, 2]: (y, x) centre of every patch of every piece, in fractions of the image,
    row-major like the vision tower's patch tokens; `boxes` are the pieces' (top, left, height,
    width) in the image (anyres.piece_boxes)."""
    cell = (np.arange(grid) + 0.5) / grid  # [g]
    b = np.asarray(boxes, dtype=np.float64)  # [K, 4]
    y = b[:, None, 0] + cell[None] * b[:, None, 2]  # [K, g]
    x = b[:, None, 1] + cell[None] * b[:, None, 3]
    yy, xx = np.broadcast_arrays(y[:, :, None], x[:, None, :])  # [K, g, g]
    return np.stack([yy, xx], axis=-1).reshape(len(b), grid * grid, 2)


def patch_objects(scene: Scene, grid: int, image_size: int, boxes=WHOLE) -> np.ndarray:
    """[K * grid * grid] long: 1 + the index of the object covering the centre of each patch of
    each piece (0 = background or padding), pieces one after another, patches row-major like the
    vision tower's patch tokens; `image_size` is the pixels per tile the scene is rendered at."""
    index = object_map(scene, image_size)  # [H, W]
    centres = patch_centres(boxes, grid).reshape(-1, 2)  # [K*P, 2]
    inside = ((centres >= 0) & (centres < 1)).all(-1)
    px = np.floor(np.clip(centres, 0, 1 - 1e-9) * index.shape + 1e-9).astype(int)  # [K*P, 2] (row, col)
    return np.where(inside, index[px[:, 0], px[:, 1]], 0).astype(np.int64)


def patch_labels(scene: Scene, grid: int, image_size: int, boxes=WHOLE, at: np.ndarray | None = None) -> torch.Tensor:
    """[K * grid * grid, 6] long labels (shape, color, size, center, row, col) of each patch of
    each piece (see patch_objects; `at` is its result where the caller has it already); row and
    col place the patch's centre on a CELLS x CELLS grid over the image, center marks the patch of
    each piece holding an object's centre."""
    if at is None:
        at = patch_objects(scene, grid, image_size, boxes)  # [K*P], 0 = background
    shapes, colors, sizes = list(SHAPES), list(COLORS), list(SIZES)
    lookup = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        lookup[i + 1] = (shapes.index(obj.shape) + 1, colors.index(obj.color) + 1, sizes.index(obj.size) + 1)
    labels = np.zeros((len(at), len(GROUPS)), dtype=np.int64)
    labels[:, :3] = lookup[at]
    centres = patch_centres(boxes, grid).reshape(-1, 2)
    labels[:, 4:6] = np.clip(np.floor(centres * CELLS), 0, CELLS - 1)  # (row, col)
    for obj in scene.objects:
        fy, fx = obj.y / scene.canvas[0], obj.x / scene.canvas[1]
        for k, (top, left, height, width) in enumerate(boxes):
            row, col = int(np.floor((fy - top) / height * grid)), int(np.floor((fx - left) / width * grid))
            if 0 <= row < grid and 0 <= col < grid:
                labels[k * grid * grid + row * grid + col, 3] = 1
    return torch.from_numpy(labels)


class PatchHead(nn.Module):
    """A linear probe from patch features [N, P, D] to every label group's logits."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, sum(GROUPS.values()))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features [N, P, D], labels [N, P, 4] -> the summed cross-entropy of the groups."""
        logits = self.proj(features).float().split(list(GROUPS.values()), dim=-1)
        return sum(F.cross_entropy(lg.flatten(0, 1), labels[..., g].flatten()) for g, lg in enumerate(logits))


_COLOR_WORDS = "|".join(COLORS)
_SHAPE_WORDS = "|".join([*SHAPES, *PLURALS.values()])
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def looked_at(scene: Scene, question: str) -> tuple[set[int], set[int], set[int]]:
    """(first, second, answer): indices of the objects of the first and the second thing
    `question` names (second = first when it names one thing), and of those its answer is about
    (the object nearest to the anchor for "nearest to ..." questions, else first and second).
    A thing is a "<colour> <shape>"; a named pair no object matches (a "no" to "Is there a red
    star?") stands for the objects sharing its colour or its shape; without pairs, the thing is
    every object of a colour or shape the question names."""
    text = question.lower()
    objs = scene.objects
    groups = []
    for m in re.finditer(rf"\b({_COLOR_WORDS}) ({_SHAPE_WORDS})\b", text):
        color, shape = m.group(1), _SINGULAR.get(m.group(2), m.group(2))
        exact = {i for i, o in enumerate(objs) if o.color == color and o.shape == shape}
        groups.append(exact or {i for i, o in enumerate(objs) if o.color == color or o.shape == shape})
    if not groups:
        words = set(re.findall(r"[a-z]+", text))
        groups.append({i for i, o in enumerate(objs) if o.color in words or o.shape in words
                       or PLURALS[o.shape] in words})
    first, second = groups[0], groups[1] if len(groups) > 1 else groups[0]
    if "nearest" in text:
        answer = {objs.index(n) for i in first if (n := nearest(scene, objs[i])) is not None}
    else:
        answer = first | second
    return first, second, answer


def named_objects(scene: Scene, question: str) -> set[int]:
    """Every object `question` points at (see looked_at)."""
    first, second, answer = looked_at(scene, question)
    return first | second | answer


def guide_loss(probs: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """probs [N, P]: one head's attention from N answer positions to the P image patches;
    relevant [N, P] bool: the patches of the objects each question points at.
    -> mean over the rows with relevant patches of -log(attention mass on them)."""
    keep = relevant.any(-1)  # [N]
    mass = (probs[keep].float() * relevant[keep]).sum(-1)  # [N']
    return -torch.log(mass + 1e-6).mean() if bool(keep.any()) else probs.sum() * 0.0


def cls_guide_loss(attention: torch.Tensor, objects: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor:
    """The class token's attention onto the objects, per image piece: attention [N, P] that each
    piece's class token pays its own patches (LLaVA-NeXT: pieces side by side in the language
    model's order, see `part`), objects [N, P] bool (patches on an object), part [N, P] (the piece
    of each patch, -1 for none; None: one piece) -> mean over the pieces showing an object of
    -log(attention mass on the object patches).

    This stands in for what CLIP's contrastive pretraining gives a real tower's class token:
    attention concentrated on the salient content, which the methods that rank patches by
    class-token attention (FasterVLM, VisionZip, HiRED, GlobalCom²) rely on."""
    part = torch.zeros_like(objects, dtype=torch.long) if part is None else part.clamp(min=0)
    pieces = int(part.max()) + 1
    mass = attention.float() * objects  # [N, P]
    on = mass.new_zeros(len(part), pieces).scatter_add_(1, part, mass)  # [N, K]
    shown = objects.new_zeros(len(part), pieces, dtype=torch.long).scatter_add_(1, part, objects.long()) > 0  # [N, K]
    return -torch.log(on[shown] + 1e-6).mean() if bool(shown.any()) else attention.sum() * 0.0


# what ObjectProbe reads of one object -> number of classes (x, y: its centre's column / row of CELLS)
ATTRIBUTES = {"shape": len(SHAPES), "color": len(COLORS), "x": CELLS, "y": CELLS}


def object_attributes(scene: Scene, objects: set[int]) -> tuple[int, ...]:
    """The ATTRIBUTES of the one object in `objects`, or -100s unless there is exactly one."""
    if len(objects) != 1:
        return (-100,) * len(ATTRIBUTES)
    obj = scene.objects[next(iter(objects))]
    return (list(SHAPES).index(obj.shape), list(COLORS).index(obj.color),
            min(int(obj.x / scene.canvas[1] * CELLS), CELLS - 1), min(int(obj.y / scene.canvas[0] * CELLS), CELLS - 1))


def relative_direction(scene: Scene, first: set[int], second: set[int]) -> tuple[int, int]:
    """Where the one object of `first` lies relative to the other one of `second`: (0 left / 1
    right, 0 above / 1 below), -100 along an axis where they are not clearly apart (as position
    questions judge it) and on both unless each set holds one object and they differ."""
    if len(first) != 1 or len(second) != 1 or first == second:
        return -100, -100
    a, b = scene.objects[next(iter(first))], scene.objects[next(iter(second))]
    where = directions(a, b)
    return (int("left" not in where) if {"left", "right"} & set(where) else -100,
            int("above" not in where) if {"above", "below"} & set(where) else -100)


SIDES = ("left", "right", "above", "below")  # the words a position question may ask about


class ObjectProbe(nn.Module):
    """A linear probe from hidden states [N, D] to the ATTRIBUTES of `objects` objects."""

    def __init__(self, dim: int, objects: int = 1):
        super().__init__()
        self.objects = objects
        self.proj = nn.Linear(dim, objects * sum(ATTRIBUTES.values()))

    def loss(self, hidden: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], attrs [N, objects, len(ATTRIBUTES)] (-100 = not one object) -> the
        summed cross-entropy of every attribute of every object, over the rows that have it."""
        logits = self.proj(hidden).float().view(len(hidden), self.objects, -1)  # [N, K, C]
        total = hidden.sum() * 0.0
        for k in range(self.objects):
            keep = attrs[:, k, 0] >= 0
            if bool(keep.any()):
                parts = logits[keep, k].split(list(ATTRIBUTES.values()), dim=-1)
                total = total + sum(F.cross_entropy(lg, attrs[keep, k, a]) for a, lg in enumerate(parts))
        return total


class Guidance(nn.Module):
    """Where the language model should look and what it should read there, at the position that
    predicts each answer's first token: in layer `layer`, head 0 on the first thing the question
    names and head 1 on the second, then the attributes of both readable after that layer; in
    layer `layer + 1`, head 0 on the objects the answer is about, whose attributes are then
    readable after it (the second hop of "the object nearest to the red circle"), as is on which
    side of the second named object the first lies (what position questions ask)."""

    def __init__(self, dim: int, layer: int):
        super().__init__()
        self.layer = layer
        self.read_named = ObjectProbe(dim, objects=2)
        self.read_answer = ObjectProbe(dim, objects=1)
        self.read_direction = nn.Linear(dim, 4)  # (left, right), (above, below)
        self.read_side = nn.Linear(dim, len(SIDES))  # the side word the question asks about

    @property
    def layers(self) -> tuple[int, int]:
        return self.layer, self.layer + 1

    def loss(self, taps: dict, at: tuple[torch.Tensor, torch.Tensor], image: slice, masks: torch.Tensor,
             attrs: torch.Tensor, dirs: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        """taps {layer: (probs [N, H, T] of the queries `at`, hidden [B, T, D])}; at: (rows [N], positions [N]);
        image: the image tokens' slots; masks [N, 3, P] bool and attrs [N, 3, len(ATTRIBUTES)]
        for (first, second, answer); dirs [N, 2] (relative_direction, -100 = none); sides [N, 2]:
        the (position, SIDES index) of the side word asked about ((-1, -100) = none), which head
        2 of the first guided layer should attend to and whose class should be readable after it."""
        rows, pos = at
        (probs1, hidden1), (probs2, hidden2) = taps[self.layers[0]], taps[self.layers[1]]
        look = (guide_loss(probs1[:, 0, image], masks[:, 0]) + guide_loss(probs1[:, 1, image], masks[:, 1])
                + guide_loss(probs2[:, 0, image], masks[:, 2]))
        read = self.read_named.loss(hidden1[rows, pos], attrs[:, :2]) + self.read_answer.loss(hidden2[rows, pos], attrs[:, 2:])
        direction = self.read_direction(hidden2[rows, pos]).float().view(-1, 2, 2)  # [N, axis, 2]
        known = dirs >= 0  # [N, 2]
        read = read + (F.cross_entropy(direction[known], dirs[known]) if bool(known.any()) else direction.sum() * 0.0)
        word_at, asked = sides.unbind(-1)  # [N] each
        asks = (word_at >= 0) & (probs1.shape[1] > 2)  # [N]
        if bool(asks.any()):
            word = F.one_hot(word_at[asks], probs1.shape[-1]).bool()  # [N', T]
            look = look + guide_loss(probs1[asks, 2], word)
            read = read + F.cross_entropy(self.read_side(hidden1[rows[asks], pos[asks]]).float(), asked[asks])
        return look + read
