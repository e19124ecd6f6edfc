"""Synthetic scenes: coloured shapes on a plain or faintly textured background.

A `Scene` is pure data: lengths are in units of the rendered `size` (one "tile"), so one scene
renders at any resolution. The default variant draws 1-6 objects on a square canvas of one tile
(coordinates are then fractions of the side); the "dense" variant 7-12 smaller ones on the same
canvas, so that a few dozen visual tokens cannot cover them all; the "hires" variant draws 4-10 smaller objects on
canvases of 2-4 tiles (672x672, 1008x336, 336x1008, 672x336, 336x672 pixels at 336), so that
LLaVA-NeXT's AnyRes picks different tile grids and a 336-pixel thumbnail blurs the objects.
Everything random comes from a seeded numpy Generator.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from math import cos, hypot, pi, sin

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {  # saturated and far apart in RGB, all far from the light-grey backgrounds
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SIZES = {"small": 0.075, "large": 0.13}  # bounding-circle radius; diameters ~15% and ~26% of the side
HIRES_SIZES = {"small": 0.035, "large": 0.055}  # radii ~12 and ~18 pixels on 336-pixel tiles
DENSE_SIZES = {"small": 0.045, "large": 0.07}  # radii ~15 and ~24 pixels at 336: a few 14-pixel patches each
MAX_COUNT = 6  # the largest number a count question may answer (the number words of the vocabulary)
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
BACKGROUND_WORDS = {"plain": "plain", "noise": "noisy", "stripes": "striped", "checker": "checkered"}

# Mildly uneven frequencies, so that "popular" objects (POPE) mean something.
SHAPE_WEIGHTS = (0.26, 0.22, 0.2, 0.17, 0.15)
COLOR_WEIGHTS = (0.22, 0.19, 0.17, 0.15, 0.14, 0.13)

MIN_GAP = 0.02  # free space between bounding circles, in tiles (fractions of a default image's side)
EDGE = 0.02  # free space between a bounding circle and the image border, in tiles


@dataclass(frozen=True)
class Variant:
    """How the scenes of a benchmark variant are drawn; lengths in tiles."""
    canvases: tuple[tuple[int, int], ...]  # (height, width) canvases, one drawn per scene
    sizes: dict[str, float]  # radius of each size word
    objects: tuple[int, int]  # fewest and most objects


VARIANTS = {
    "default": Variant(((1, 1),), SIZES, (1, 6)),
    "hires": Variant(((2, 2), (1, 3), (3, 1), (1, 2), (2, 1)), HIRES_SIZES, (4, 10)),
    "dense": Variant(((1, 1),), DENSE_SIZES, (7, 12)),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    x: float  # centre, tiles from the left (on the default 1 x 1 canvas a fraction of the width)
    y: float  # centre, tiles from the top
    radius: float  # bounding circle, tiles

    @property
    def name(self) -> str:
        """How questions refer to it: "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str  # one of BACKGROUNDS
    background_level: int  # base grey of the background, 0-255
    texture_seed: int  # seeds the background texture (noise, stripe angle)
    canvas: tuple[int, int] = (1, 1)  # (height, width) in tiles

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        if self.canvas == (1, 1):  # default scenes are written as before the hires variant
            del d["canvas"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(SceneObject(**o) for o in d["objects"]), d["background"], int(d["background_level"]),
                   int(d["texture_seed"]), tuple(d.get("canvas", (1, 1))))


def random_scene(rng: np.random.Generator, variant: str = "default", canvas: tuple[int, int] | None = None) -> Scene:
    """A scene of the variant with non-overlapping objects; retries whole layouts until one fits.
    A variant with one canvas draws none (default scenes are the same as before hires existed);
    `canvas` (one of the variant's) skips the draw."""
    v = VARIANTS[variant]
    if canvas is None:
        canvas = v.canvases[int(rng.integers(len(v.canvases)))] if len(v.canvases) > 1 else v.canvases[0]
    elif canvas not in v.canvases:
        raise ValueError(f"canvas {canvas} is not one of the {variant} variant's {v.canvases}")
    while True:
        count = int(rng.integers(v.objects[0], v.objects[1] + 1))
        objects: list[SceneObject] = []
        for _ in range(count):
            obj = _place(rng, objects, v.sizes, canvas)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == count and _countable(objects):
            break
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(tuple(objects), background, int(rng.integers(195, 236)), int(rng.integers(2**31)), canvas)


def _countable(objects: list[SceneObject]) -> bool:
    """No shape and no colour more than MAX_COUNT times (always so with up to 6 objects)."""
    counts = Counter(o.shape for o in objects) + Counter(o.color for o in objects)
    return max(counts.values()) <= MAX_COUNT


def _place(rng: np.random.Generator, placed: list[SceneObject], sizes: dict[str, float], canvas: tuple[int, int],
           tries: int = 100) -> SceneObject | None:
    shape = SHAPES[int(rng.choice(len(SHAPES), p=SHAPE_WEIGHTS))]
    color = list(COLORS)[int(rng.choice(len(COLORS), p=COLOR_WEIGHTS))]
    size = "large" if rng.random() < 0.5 else "small"
    r = sizes[size]
    far = np.array(canvas[::-1]) - r - EDGE  # [2] largest x, y
    for _ in range(tries):
        x, y = (round(float(v), 4) for v in rng.uniform(r + EDGE, far, size=2))
        if all(hypot(x - o.x, y - o.y) > r + o.radius + MIN_GAP for o in placed):
            return SceneObject(shape, color, size, x, y, r)
    return None


def overlaps(a: SceneObject, b: SceneObject) -> bool:
    """Bounding-circle test."""
    return hypot(a.x - b.x, a.y - b.y) <= a.radius + b.radius


# ---- rendering ----

def render(scene: Scene, size: int = 336) -> Image.Image:
    """The scene as an RGB image of size pixels per tile (size x size for a default scene)."""
    img = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, size)
    return img


def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(scene.texture_seed))
    level = float(scene.background_level)
    h, w = scene.canvas[0] * size, scene.canvas[1] * size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / size  # [H, W] in tiles
    if scene.background == "plain":
        grey = np.full((h, w), level, np.float32)
    elif scene.background == "noise":
        grey = level + rng.uniform(-12, 12, size=(h, w)).astype(np.float32)
    elif scene.background == "stripes":
        angle = float(rng.uniform(0, pi))
        period = float(rng.uniform(0.06, 0.12))
        phase = (xx * cos(angle) + yy * sin(angle)) / period
        grey = level + np.where(np.floor(phase) % 2 == 0, 8.0, -8.0).astype(np.float32)
    elif scene.background == "checker":
        cells = int(rng.integers(6, 13))
        parity = (np.floor(xx * cells) + np.floor(yy * cells)) % 2
        grey = level + np.where(parity == 0, 8.0, -8.0).astype(np.float32)
    else:
        raise ValueError(f"unknown background {scene.background!r}")
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W, 3]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape inscribed in the circle (cx, cy, r), in pixels; circles have none."""
    if shape == "square":
        h = r / 2**0.5
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up
        return [(cx + r * cos(a), cy + r * sin(a)) for a in (-pi / 2, pi / 6, 5 * pi / 6)]
    if shape == "star":  # five points, inner radius 0.45 r
        return [(cx + rad * cos(-pi / 2 + k * pi / 5), cy + rad * sin(-pi / 2 + k * pi / 5))
                for k, rad in ((k, r if k % 2 == 0 else 0.45 * r) for k in range(10))]
    if shape == "cross":  # a plus sign with arms 0.6 r wide
        w, a = 0.3 * r, 0.9 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int, fill=None) -> None:
    """Draw `obj` on a canvas of size pixels per tile in its colour, or in `fill` (e.g. a label value)."""
    cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
    fill = COLORS[obj.color] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_points(obj.shape, cx, cy, r), fill=fill)


# ---- captions ----

def _cell(obj: SceneObject, canvas: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the object on a 3 x 3 grid over the canvas."""
    return min(int(obj.y * 3 / canvas[0]), 2), min(int(obj.x * 3 / canvas[1]), 2)


def location(obj: SceneObject, canvas: tuple[int, int] = (1, 1)) -> str:
    """Where the object sits on a 3 x 3 grid: "top left", "top", ..., "center", ..."""
    r, c = _cell(obj, canvas)
    return " ".join(w for w in (("top", "", "bottom")[r], ("left", "", "right")[c]) if w) or "center"


def caption(scene: Scene) -> str:
    """A one-line description, objects in reading order:
    "a noisy background with 2 objects: a large red circle at the top left, a small blue star at the center"."""
    ordered = sorted(scene.objects, key=lambda o: (_cell(o, scene.canvas)[0], o.x))
    parts = [f"a {o.size} {o.color} {o.shape} at the {location(o, scene.canvas)}" for o in ordered]
    n = len(scene.objects)
    return (f"a {BACKGROUND_WORDS[scene.background]} background with {n} object{'s' if n != 1 else ''}: "
            + ", ".join(parts))
