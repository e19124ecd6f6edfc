"""Dense auxiliary targets that speed up training of the embedded model.

The embedded model's vision tower starts from random weights (real LLaVA starts from a
pretrained CLIP). An answer gives it a weak, sparse signal; a per-patch label gives it 576 dense
ones per image. For every patch of the grid we know from the scene what covers its centre: the
shape, the colour and the size of the object there (or background), and whether the object's
centre lies in this patch (so that objects can be counted). A linear head on the features that
LLaVA reads predicts them; the head is used in training only and never saved.

The language model must also learn where to look: a question about "the red object" is answered
from the few patches of that object among 576. `named_objects` reads off the scene which objects a
question points at, and `guide_loss` pulls one attention head of one layer, at the position that
predicts the answer, onto their patches, and `ObjectProbe` asks that the shape and colour of the
one object a question names be readable (linearly) at that position right after that layer —
the look-then-read circuit the answer needs (training-only losses; inference is unchanged).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .evaluation.questions import nearest
from .evaluation.scenes import COLORS, PLURALS, SHAPES, SIZES, Scene, draw_object

# label group -> number of classes (0 = background / no)
GROUPS = {"shape": len(SHAPES) + 1, "color": len(COLORS) + 1, "size": len(SIZES) + 1, "center": 2}


def object_map(scene: Scene, size: int) -> np.ndarray:
    """[size, size] uint8: 1 + the index of the object drawn at each pixel, 0 on the background."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        draw_object(draw, obj, size, fill=i + 1)
    return np.asarray(img)


def patch_objects(scene: Scene, grid: int, image_size: int) -> np.ndarray:
    """[grid * grid] long: 1 + the index of the object covering each patch's centre (0 =
    background), row-major like the vision tower's patch tokens."""
    index = object_map(scene, image_size)
    centres = ((np.arange(grid) + 0.5) * (image_size / grid)).astype(int)
    return index[centres[:, None], centres[None, :]].reshape(-1).astype(np.int64)


def patch_labels(scene: Scene, grid: int, image_size: int) -> torch.Tensor:
    """[grid * grid, 4] long labels (shape, color, size, center) per patch, row-major like the
    vision tower's patch tokens."""
    at = patch_objects(scene, grid, image_size)  # [P], 0 = background
    shapes, colors, sizes = list(SHAPES), list(COLORS), list(SIZES)
    lookup = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        lookup[i + 1] = (shapes.index(obj.shape) + 1, colors.index(obj.color) + 1, sizes.index(obj.size) + 1)
    labels = np.zeros((grid * grid, 4), dtype=np.int64)
    labels[:, :3] = lookup[at]
    for obj in scene.objects:
        col, row = min(int(obj.x * grid), grid - 1), min(int(obj.y * grid), grid - 1)
        labels[row * grid + col, 3] = 1
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


def named_objects(scene: Scene, question: str) -> set[int]:
    """Indices of the objects `question` points at: each "<colour> <shape>" it names, else each
    colour or shape it names alone, plus the object nearest to an anchor ("nearest to the ...").
    A named pair that no object matches (a "no" to "Is there a red star?") points at the objects
    sharing its colour or its shape."""
    text = question.lower()
    objs = scene.objects
    picked: set[int] = set()
    pairs = re.findall(rf"\b({_COLOR_WORDS}) ({_SHAPE_WORDS})\b", text)
    for color, shape in pairs:
        shape = _SINGULAR.get(shape, shape)
        exact = {i for i, o in enumerate(objs) if o.color == color and o.shape == shape}
        picked |= exact or {i for i, o in enumerate(objs) if o.color == color or o.shape == shape}
    if not pairs:
        words = set(re.findall(r"[a-z]+", text))
        picked |= {i for i, o in enumerate(objs) if o.color in words or o.shape in words
                   or PLURALS[o.shape] in words}
    if "nearest" in text:
        picked |= {objs.index(n) for i in list(picked) if (n := nearest(scene, objs[i])) is not None}
    return picked


def guide_loss(probs: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """probs [N, P]: one head's attention from N answer positions to the P image patches;
    relevant [N, P] bool: the patches of the objects each question points at.
    -> mean over N of -log(attention mass on the relevant patches)."""
    mass = (probs.float() * relevant).sum(-1)  # [N]
    return -torch.log(mass + 1e-6).mean()


def object_attributes(scene: Scene, named: set[int]) -> tuple[int, int]:
    """(shape index, colour index) of the one named object, or (-100, -100) unless exactly one."""
    if len(named) != 1:
        return -100, -100
    obj = scene.objects[next(iter(named))]
    return list(SHAPES).index(obj.shape), list(COLORS).index(obj.color)


class ObjectProbe(nn.Module):
    """A linear probe from hidden states [N, D] to the shape and colour of the named object."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, len(SHAPES) + len(COLORS))

    def loss(self, hidden: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], attrs [N, 2] (shape, colour; -100 = no single object) -> summed
        cross-entropy over the rows that have one object (0 if none has)."""
        keep = attrs[:, 0] >= 0  # [N]
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        shape, color = self.proj(hidden[keep]).float().split([len(SHAPES), len(COLORS)], dim=-1)
        return F.cross_entropy(shape, attrs[keep, 0]) + F.cross_entropy(color, attrs[keep, 1])
