"""Dense auxiliary targets that teach the vision tower to see shapes quickly during training.

The embedded model's vision tower starts from random weights (real LLaVA starts from a
pretrained CLIP). An answer gives it a weak, sparse signal; a per-patch label gives it 576 dense
ones per image. For every patch of the grid we know from the scene what covers its centre: the
shape, the colour and the size of the object there (or background), and whether the object's
centre lies in this patch (so that objects can be counted). A linear head on the features that
LLaVA reads predicts them; the head is used in training only and never saved.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .evaluation.scenes import COLORS, SHAPES, SIZES, Scene, draw_object

# label group -> number of classes (0 = background / no)
GROUPS = {"shape": len(SHAPES) + 1, "color": len(COLORS) + 1, "size": len(SIZES) + 1, "center": 2}


def object_map(scene: Scene, size: int) -> np.ndarray:
    """[size, size] uint8: 1 + the index of the object drawn at each pixel, 0 on the background."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        draw_object(draw, obj, size, fill=i + 1)
    return np.asarray(img)


def patch_labels(scene: Scene, grid: int, image_size: int) -> torch.Tensor:
    """[grid * grid, 4] long labels (shape, color, size, center) per patch, row-major like the
    vision tower's patch tokens."""
    index = object_map(scene, image_size)
    step = image_size / grid
    centres = ((np.arange(grid) + 0.5) * step).astype(int)
    at = index[centres[:, None], centres[None, :]].reshape(-1)  # [P], 0 = background
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
