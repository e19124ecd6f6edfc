"""The shapes generator: determinism, layouts, and answers re-derived independently from scenes."""

import hashlib
import json
import math
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from fastllava.errors import UserError
from fastllava.evaluation import FAMILIES, STRATEGIES, VOCABULARY, Scene, caption, generate_dataset, prompt, render
from fastllava.cli import main
from fastllava.evaluation.scenes import COLORS, HIRES_SIZES, MAX_COUNT, PLURALS, SHAPES, VARIANTS

N, SIZE, PER_IMAGE = 360, 96, 3


def _make(path, seed):
    return generate_dataset(N, seed, path, image_size=SIZE, questions_per_image=PER_IMAGE, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    np.random.seed(123)  # the generator must not depend on numpy's global RNG
    _make(root / "a", 1)
    np.random.seed(456)
    _make(root / "b", 1)
    _make(root / "c", 2)
    return root


def _rows(path, name="questions.jsonl"):
    return [json.loads(line) for line in (path / name).read_text().splitlines()]


def _scenes(path):
    return {r["image"]: Scene.from_dict(r["scene"]) for r in _rows(path, "scenes.jsonl")}


def _pixels(path, image):
    return np.asarray(Image.open(path / image).convert("RGB"))


def test_same_seed_same_files_and_pixels(data):
    a, b = data / "a", data / "b"
    for name in ("questions.jsonl", "scenes.jsonl", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    images = sorted(p.name for p in (a / "images").iterdir())
    assert images == sorted(p.name for p in (b / "images").iterdir())
    for name in images:
        assert np.array_equal(_pixels(a, f"images/{name}"), _pixels(b, f"images/{name}"))


def test_different_seed_differs(data):
    a, c = data / "a", data / "c"
    assert (a / "questions.jsonl").read_bytes() != (c / "questions.jsonl").read_bytes()
    assert not np.array_equal(_pixels(a, "images/000000.png"), _pixels(c, "images/000000.png"))


def test_meta_and_layout(data):
    meta = json.loads((data / "a" / "meta.json").read_text())
    assert (meta["seed"], meta["n"], meta["image_size"]) == (1, N, SIZE)
    rows = _rows(data / "a")
    assert len(rows) == N
    assert len({r["id"] for r in rows}) == N
    for r in rows:
        assert set(r) <= {"id", "image", "question", "prompt", "answer", "family", "strategy"}
        assert Image.open(data / "a" / r["image"]).size == (SIZE, SIZE)


def test_objects_fit_and_do_not_overlap(data):
    scenes = _scenes(data / "a")
    counts = Counter(len(s.objects) for s in scenes.values())
    assert set(counts) == set(range(1, 7))
    for s in scenes.values():
        for o in s.objects:
            assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius
        for p, q in combinations(s.objects, 2):
            assert math.hypot(p.x - q.x, p.y - q.y) > p.radius + q.radius
    assert {s.background for s in scenes.values()} == {"plain", "noise", "stripes", "checker"}


def test_pixels_at_centres_have_the_declared_colour(data):
    for image, scene in _scenes(data / "a").items():
        px = _pixels(data / "a", image)
        for o in scene.objects:
            assert tuple(px[int(o.y * SIZE), int(o.x * SIZE)]) == COLORS[o.color], (image, o)


def test_drawn_pixels_stay_inside_their_bounding_circles(data):
    palette = {v: k for k, v in COLORS.items()}
    for scene in list(_scenes(data / "a").values())[:40]:
        plain = Scene(scene.objects, "plain", scene.background_level, 0)
        px = np.asarray(render(plain, SIZE)).reshape(-1, 3)
        ys, xs = np.divmod(np.arange(SIZE * SIZE), SIZE)
        drawn = np.any(px != scene.background_level, axis=1)
        assert drawn.any() == bool(scene.objects)
        for i in np.flatnonzero(drawn):  # distance beyond the edge of each bounding circle, in pixels
            outside, owner = min((math.hypot(xs[i] + 0.5 - o.x * SIZE, ys[i] + 0.5 - o.y * SIZE) - o.radius * SIZE, k)
                                 for k, o in enumerate(scene.objects))
            assert outside <= 1.0 and palette.get(tuple(px[i])) == scene.objects[owner].color


def test_render_size_is_a_parameter(data):
    scene = next(iter(_scenes(data / "a").values()))
    assert render(scene).size == (336, 336)
    assert render(scene, 112).size == (112, 112)


def _find(scene, color, shape):
    hits = [o for o in scene.objects if o.color == color and o.shape == shape]
    assert len(hits) == 1, f"the {color} {shape} is not uniquely referable"
    return hits[0]


def _side(a, b, relation):
    """Is a `relation` of b, with clear separation? None when they are not clearly apart."""
    gap = a.radius + b.radius
    dx, dy = a.x - b.x, a.y - b.y
    if relation in ("left of", "right of"):
        return None if abs(dx) <= gap else (dx < 0) == (relation == "left of")
    return None if abs(dy) <= gap else (dy < 0) == (relation == "above")


def _derive(scene, q):
    """The answer to question q, worked out again from the scene."""
    shape_of_plural = {v: k for k, v in PLURALS.items()}
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        hits = [o for o in scene.objects if o.shape == m[1]]
        assert len(hits) == 1
        return hits[0].color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        hits = [o for o in scene.objects if o.color == m[1]]
        assert len(hits) == 1
        return hits[0].shape
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return str(sum(o.color == m[1] for o in scene.objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(o.shape == shape_of_plural[m[1]] for o in scene.objects))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in scene.objects) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q):
        truth = _side(_find(scene, m[1], m[2]), _find(scene, m[4], m[5]), m[3])
        assert truth is not None, "objects not clearly apart"
        return "yes" if truth else "no"
    if m := re.fullmatch(r"Which side of the (\w+) (\w+) is the (\w+) (\w+) on\?", q):
        b, a = _find(scene, m[1], m[2]), _find(scene, m[3], m[4])
        assert _side(a, b, "left of") is not None
        return "left" if a.x < b.x else "right"
    if m := re.fullmatch(r"What (color|shape) is the object nearest to the (\w+) (\w+)\?", q):
        anchor = _find(scene, m[2], m[3])
        by_distance = sorted(((math.hypot(o.x - anchor.x, o.y - anchor.y), o) for o in scene.objects
                              if o is not anchor), key=lambda t: t[0])
        if len(by_distance) > 1:
            assert by_distance[1][0] >= 1.2 * by_distance[0][0], "nearest object is ambiguous"
        near = by_distance[0][1]
        return near.color if m[1] == "color" else near.shape
    raise AssertionError(f"unexpected question {q!r}")


def test_answers_are_right_by_construction(data):
    scenes = _scenes(data / "a")
    for r in _rows(data / "a"):
        assert _derive(scenes[r["image"]], r["question"]) == r["answer"], r


def test_families_are_balanced_and_varied(data):
    rows = _rows(data / "a")
    per_family = Counter(r["family"] for r in rows)
    assert set(per_family) == set(FAMILIES)
    assert min(per_family.values()) >= N // len(FAMILIES) - 3
    answers = {f: Counter(r["answer"] for r in rows if r["family"] == f) for f in FAMILIES}
    assert set(answers["color"]) == set(COLORS)
    assert set(answers["shape"]) == set(SHAPES)
    assert {"0", "1", "2"} <= set(answers["count"])
    assert abs(answers["position"]["yes"] - answers["position"]["no"]) <= 20
    assert {"left", "right"} <= set(answers["position"])
    assert len(answers["relation"]) >= 8  # colours and shapes


def test_exist_negatives_follow_pope_strategies(data):
    rows = [r for r in _rows(data / "a") if r["family"] == "exist"]
    scenes = _scenes(data / "a")
    combos = Counter((r["strategy"], r["answer"]) for r in rows)
    assert {s for s, _ in combos} == set(STRATEGIES)
    assert max(combos.values()) - min(combos.values()) <= 1  # yes/no balanced in every strategy
    planned = list(scenes.values())[:math.ceil(N / PER_IMAGE)]
    held = Counter(p for s in planned for p in {(o.color, o.shape) for o in s.objects})
    ranking = sorted(held, key=lambda p: -held[p])
    for r in rows:
        if r["answer"] == "yes":
            continue
        color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", r["question"]).groups()
        scene = scenes[r["image"]]
        if r["strategy"] == "adversarial":
            assert any(o.color == color or o.shape == shape for o in scene.objects)
        if r["strategy"] == "popular":  # among the 3 most frequent pairs absent from the image
            assert sum(held[p] > held[color, shape] for p in ranking) <= 2 + len(scene.objects)


def test_every_word_is_in_the_vocabulary(data):
    vocab = set(VOCABULARY)
    texts = [prompt(r["question"]) + " " + r["answer"] for r in _rows(data / "a")]
    texts += [caption(s) for s in _scenes(data / "a").values()]
    words = {w for t in texts for w in re.findall(r"\w+", t.lower())}
    assert words <= vocab, words - vocab
    assert all(w == w.lower() for w in vocab)


def test_caption_describes_the_objects(data):
    for scene in list(_scenes(data / "a").values())[:20]:
        text = caption(scene)
        assert text.count(" at the ") == len(scene.objects)
        for o in scene.objects:
            assert f"a {o.size} {o.color} {o.shape} at the " in text


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown question families"):
        generate_dataset(10, 0, tmp_path / "x", families=["colour"], progress=False)
    with pytest.raises(UserError, match="at least 32"):
        generate_dataset(10, 0, tmp_path / "y", image_size=8, progress=False)
    generate_dataset(6, 0, tmp_path / "z", image_size=32, families=["count"], progress=False)
    assert {r["family"] for r in _rows(tmp_path / "z")} == {"count"}
    with pytest.raises(UserError, match="already holds a dataset"):
        generate_dataset(6, 0, tmp_path / "z", image_size=32, progress=False)


# ---- the default variant is what it was before the hires variant existed ----

def _digest(path) -> dict[str, str]:
    """sha256 of the JSON files and of all images' pixels."""
    out = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in ("questions.jsonl", "scenes.jsonl", "meta.json")}
    h = hashlib.sha256()
    for image in sorted((path / "images").iterdir()):
        h.update(image.name.encode() + np.asarray(Image.open(image).convert("RGB")).tobytes())
    return {**out, "pixels": h.hexdigest()}


def test_default_variant_is_unchanged(tmp_path):
    """Digests of `generate_dataset(30, 7, image_size=64)` made with the code before `--variant` (the
    questions since each line carries its `prompt`; without that field they hash as before; meta.json
    since dataset version 2, whose only change is `describe`'s accepted orders, not asked here)."""
    generate_dataset(30, 7, tmp_path, image_size=64, progress=False)
    assert _digest(tmp_path) == {
        "questions.jsonl": "db5951dfb1a7cb4de1ceed72a4d6e6ba8877f44629f7fd620eba2ae8d7a45746",
        "scenes.jsonl": "56ea0666110fd64d85ce05cd207279a94eeaa64c4340f4b5fae0bdea3b31c36c",
        "meta.json": "00bd63b3e38c288ec416b240afa0108473fc0d6e00485750fe8ef08d45fcccd9",
        "pixels": "81561806345464532a9e0b4d9040fe3629b71507e4739d4238a4fb1c792210d7",
    }


# ---- the hires variant ----

HIRES_N, TILE = 120, 336
CANVAS_PIXELS = {(672, 672), (1008, 336), (336, 1008), (672, 336), (336, 672)}  # (width, height)


@pytest.fixture(scope="module")
def hires(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires")
    for name in ("a", "b"):
        generate_dataset(HIRES_N, 4, root / name, image_size=TILE, progress=False, variant="hires")
    return root / "a", root / "b"


def test_hires_is_deterministic_per_seed(hires):
    assert _digest(hires[0]) == _digest(hires[1])
    assert json.loads((hires[0] / "meta.json").read_text())["variant"] == "hires"


def test_hires_answers_are_right_by_construction(hires):
    scenes = _scenes(hires[0])
    rows = _rows(hires[0])
    assert len(rows) == HIRES_N and {r["family"] for r in rows} == set(FAMILIES)
    for r in rows:
        assert _derive(scenes[r["image"]], r["question"]) == r["answer"], r
    assert max(int(r["answer"]) for r in rows if r["family"] == "count") <= MAX_COUNT


def test_hires_canvases_and_objects(hires):
    scenes = _scenes(hires[0])
    sizes = set()
    for image, s in scenes.items():
        h, w = s.canvas
        assert Image.open(hires[0] / image).size == (w * TILE, h * TILE)
        sizes.add((w * TILE, h * TILE))
        assert 4 <= len(s.objects) <= 10
        for o in s.objects:
            assert o.radius == HIRES_SIZES[o.size]
            assert o.radius <= o.x <= w - o.radius and o.radius <= o.y <= h - o.radius
            # on a tile the object spans more than one 14-pixel patch, on the 336-pixel thumbnail
            # (the canvas squeezed along its long side) less than 1.5
            diameter = 2 * o.radius * TILE
            assert diameter > 14 and diameter * TILE / (max(h, w) * TILE) < 21
        for p, q in combinations(s.objects, 2):
            assert math.hypot(p.x - q.x, p.y - q.y) > p.radius + q.radius
    assert sizes == CANVAS_PIXELS


def test_hires_pixels_at_centres_have_the_declared_colour(hires):
    for image, scene in _scenes(hires[0]).items():
        px = _pixels(hires[0], image)
        for o in scene.objects:
            assert tuple(px[int(o.y * TILE), int(o.x * TILE)]) == COLORS[o.color], (image, o)


def test_variant_must_be_known(tmp_path, capsys):
    assert set(VARIANTS) == {"default", "hires", "dense"}
    with pytest.raises(UserError, match="unknown variant 'huge'; choose from default, hires, dense"):
        generate_dataset(3, 0, tmp_path / "x", variant="huge", progress=False)
    assert main(["data", "shapes", "--n", "3", "--variant", "huge", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'huge'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()
