"""Image reading and CLIP preprocessing against transformers' CLIPImageProcessor."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava.errors import UserError
from fastllava.images import MAX_ASPECT, ImageProcessor, expand_to_square, load_image


def _photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise and a few shapes: a stand-in for a real photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1)
    base += rng.normal(0, 12, base.shape)
    base[h // 4: h // 2, w // 3: w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


SIZES = [(640, 480), (333, 500), (336, 336), (1000, 250), (200, 150)]


@pytest.mark.parametrize("crop", [336, 224])
def test_matches_clip_image_processor(crop):
    from transformers import CLIPImageProcessor

    cfg = {"size": {"shortest_edge": crop}, "crop_size": {"height": crop, "width": crop},
           "do_resize": True, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
           "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]}
    ref = CLIPImageProcessor(**cfg)
    ours = ImageProcessor.from_config(cfg, crop)
    images = [_photo_like(w, h, i) for i, (w, h) in enumerate(SIZES)]
    expected = ref(images=images, return_tensors="pt")["pixel_values"]
    got = ours(images)
    assert got.shape == expected.shape == (len(SIZES), 3, crop, crop)
    assert (got - expected).abs().max().item() <= 1e-5


def test_pad_to_square_uses_mean_colour_and_centres():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(img, (122, 116, 104))
    assert sq.size == (40, 40)
    arr = np.asarray(sq)
    assert tuple(arr[0, 0]) == (122, 116, 104)
    assert tuple(arr[20, 20]) == (255, 0, 0)
    assert tuple(arr[10, 0]) == (255, 0, 0) and tuple(arr[9, 0]) == (122, 116, 104)
    proc = ImageProcessor(shortest_edge=32, crop_hw=(32, 32), pad_to_square=True)
    plain = ImageProcessor(shortest_edge=32, crop_hw=(32, 32))
    assert not torch.allclose(proc([img]), plain([img]))  # padding keeps the whole image


def test_inputs_in_every_form_agree(tmp_path):
    img = _photo_like(64, 48, 3)
    path = tmp_path / "a.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    proc = ImageProcessor(shortest_edge=32, crop_hw=(32, 32))
    forms = [img, np.asarray(img), np.asarray(img).astype(np.float32) / 255, str(path), path, buf.getvalue()]
    outs = [proc([f]) for f in forms]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], atol=1e-6)


def test_preprocessor_config_read_from_directory(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 48}, "crop_size": {"height": 40, "width": 40}, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "do_pad": True}))
    proc = ImageProcessor.from_dir(tmp_path, 336)
    assert (proc.shortest_edge, proc.crop_hw, proc.mean, proc.pad_to_square) == (48, (40, 40), (0.5,) * 3, True)
    assert proc([_photo_like(100, 60, 0)]).shape == (1, 3, 40, 40)


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    buf = io.BytesIO()
    _photo_like(64, 64, 1).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {
        tmp_path / "missing.png": "does not exist",
        tmp_path / "empty.png": "empty",
        tmp_path / "text.png": "not an image",
        tmp_path / "trunc.png": "truncated",
        tmp_path: "not a file",
    }
    for path, words in cases.items():
        with pytest.raises(UserError, match=words) as e:
            load_image(path)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not an image"):
        load_image(b"\x00\x01garbage")
    with pytest.raises(UserError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(UserError, match="unsupported image type"):
        load_image(12)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    big = Image.new("L", (20000, 20000))  # 400 M pixels, compresses to a few hundred kB
    path = tmp_path / "bomb.png"
    big.save(path, optimize=False)
    with pytest.raises(UserError, match="too large|over the limit"):
        load_image(path)
    with pytest.raises(UserError, match="over the limit"):
        load_image(_photo_like(64, 64, 0), max_pixels=1000)


def test_extreme_aspect_ratios_refused_before_decoding():
    """Sides more than MAX_ASPECT-fold apart: the shortest-edge resize would blow the long one up
    (1 x 16 M pixels -> 336 x 5.4 G)."""
    load_image(Image.new("RGB", (MAX_ASPECT, 1)))  # at the limit: accepted
    thin = io.BytesIO()
    Image.new("L", (1, MAX_ASPECT + 1)).save(thin, format="PNG")
    for image in (Image.new("RGB", (MAX_ASPECT + 1, 1)), thin.getvalue(), np.zeros((16_000_000, 1), np.uint8)):
        with pytest.raises(UserError, match=f"differ at most {MAX_ASPECT}-fold") as e:
            ImageProcessor()([image])
        assert "\n" not in str(e.value)


def test_preprocessing_never_makes_an_image_over_the_pixel_limit():
    wide = Image.new("RGB", (9000, 900))  # 8.1 M pixels, 10:1
    with pytest.raises(UserError, match="padded to a square would be 9000x9000") as e:
        ImageProcessor(pad_to_square=True)([wide])  # 81 M pixels
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="resized would be 80000x8000"):
        ImageProcessor(shortest_edge=8000)([Image.new("RGB", (1000, 100))])
    assert ImageProcessor()([wide]).shape == (1, 3, 336, 336)
