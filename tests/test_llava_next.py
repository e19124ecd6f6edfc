"""LLaVA-NeXT (AnyRes) against transformers' LlavaNextForConditionalGeneration and
LlavaNextImageProcessor on tiny random models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava import anyres
from fastllava.evaluation.tokenizer import build_word_tokenizer
from hf_reference import IMAGE_TOKEN, PINPOINTS, VOCAB, save_checkpoint, tiny_llava

# (height, width) before preprocessing: 1:4, 4:1, square, and odd sizes that unpad unevenly
SIZES = [(40, 160), (160, 40), (50, 50), (37, 91), (120, 90), (300, 20)]
PROCESSOR = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
             "image_grid_pinpoints": PINPOINTS, "do_pad": True}

CONFIGS = {
    # name: (tiny_llava kwargs, key layout)
    "vicuna-original": (dict(text="llama", kv_heads=4), "original"),
    "mistral-gqa-window-new": (dict(text="mistral", kv_heads=2, sliding_window=40, feature_layer=[-3, -1]), "new"),
}


def _photo(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _hf_processor(**overrides):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(**{**PROCESSOR, **overrides})


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs, layout = CONFIGS[request.param]
    hf = tiny_llava(pinpoints=PINPOINTS, seed=5, **kwargs)
    path = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout)
    return request.param, hf, fastllava.load(path, device="cpu", dtype="float32")


def _batch(cfg, sizes, seed=1):
    """One left-padded row per image: BOS, text, the image's tokens, text; pixel_values and
    image_sizes from transformers' processor."""
    g = torch.Generator().manual_seed(seed)
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    rows = []
    for i, (h, w) in enumerate(sizes):
        before = torch.randint(3, IMAGE_TOKEN, (1 + i % 3,), generator=g)
        after = torch.randint(3, IMAGE_TOKEN, (4,), generator=g)
        image = torch.full((cfg.image_tokens(h, w),), IMAGE_TOKEN)
        rows.append(torch.cat([torch.tensor([1]), before, image, after]))
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
    out = _hf_processor()(images=images, return_tensors="pt")
    return ids, mask, out["pixel_values"], out["image_sizes"]


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pixels, sizes = _batch(ours.config, SIZES)
    assert pixels.dim() == 5
    with torch.no_grad():  # transformers checks that the image tokens match its features
        ref = hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=mask).logits
    got = ours.logits(ids, pixels, attention_mask=mask, image_sizes=sizes)
    real = mask.bool()
    assert got.shape == ref.shape
    diff = (got[real] - ref[real]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    assert ref[real].std() > 1e-2


def test_greedy_tokens_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pixels, sizes = _batch(ours.config, SIZES[:4], seed=2)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=mask,
                          max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate_ids(ids, pixels, attention_mask=mask, image_sizes=sizes, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(got, ref), f"{name}:\n{got}\n{ref}"


def test_flat_tiles_equal_padded_tiles(pair):
    """pixel_values as [sum of tiles, C, H, W] give what the zero-padded 5-D form gives."""
    _, _, ours = pair
    ids, mask, pixels, sizes = _batch(ours.config, SIZES[:3])
    counts = [anyres.tile_grid(tuple(s), PINPOINTS, 32) for s in sizes.tolist()]
    flat = torch.cat([p[:r * c + 1] for p, (r, c) in zip(pixels, counts)])
    a = ours.logits(ids, pixels, attention_mask=mask, image_sizes=sizes)
    b = ours.logits(ids, flat, attention_mask=mask, image_sizes=sizes)
    assert torch.equal(a, b)


def test_both_layouts_load_the_same_weights(tmp_path):
    hf = tiny_llava(pinpoints=PINPOINTS, seed=6)
    ids, mask, pixels, sizes = _batch(fastllava.load(save_checkpoint(hf, tmp_path / "saved"), device="cpu").config,
                                      SIZES[:2])
    outs = [fastllava.load(save_checkpoint(hf, tmp_path / layout, layout), device="cpu")
            .logits(ids, pixels, attention_mask=mask, image_sizes=sizes) for layout in ("saved", "new", "original")]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("tile", [32, 336])
def test_processing_matches_llava_next_image_processor(tmp_path, tile):
    pinpoints = [[h // 32 * tile, w // 32 * tile] for h, w in PINPOINTS]  # transformers' defaults at 336
    cfg = {**PROCESSOR, "size": {"shortest_edge": tile}, "crop_size": {"height": tile, "width": tile},
           "image_grid_pinpoints": pinpoints}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = fastllava.images.AnyresProcessor.from_dir(tmp_path, [tuple(p) for p in pinpoints], tile)
    sizes = [(h * tile // 32, w * tile // 32) for h, w in SIZES] + [(480, 640), (333, 500), (1000, 250)]
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    expected = _hf_processor(**cfg)(images=images, return_tensors="pt")
    pixels, image_sizes = ours(images)
    assert torch.equal(image_sizes, expected["image_sizes"])
    assert pixels.shape == expected["pixel_values"].shape
    assert (pixels - expected["pixel_values"]).abs().max().item() <= 1e-5


def test_geometry_matches_transformers():
    """Canvas choice, resize inside it and unpadding, for many sizes at LLaVA-NeXT-7B's pinpoints."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    sizes = np.random.default_rng(0).integers(1, 2500, (300, 2)).tolist() + [[336, 1344], [1344, 336], [1, 100]]
    for h, w in sizes:
        best = select_best_resolution((h, w), pinpoints)
        assert anyres.best_resolution((h, w), pinpoints) == tuple(best)
        assert anyres.fit_size((h, w), best) == get_patch_output_size(
            np.broadcast_to(np.uint8(0), (1, h, w)), best, ChannelDimension.FIRST)
        grid = (best[0] // 336 * 24, best[1] // 336 * 24)
        feats = torch.arange(grid[0] * grid[1]).view(1, *grid)
        ys, xs = anyres.unpadded_box((h, w), grid)
        assert torch.equal(feats[:, ys, xs], unpad_image(feats, (h, w)))


def test_save_model_loads_in_transformers(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    from fastllava.checkpoint import save_model

    hf = tiny_llava(pinpoints=PINPOINTS, seed=8, feature_layer=-1)
    ours = fastllava.load(save_checkpoint(hf, tmp_path / "a", "new"), device="cpu")
    back = LlavaNextForConditionalGeneration.from_pretrained(save_model(ours.model, tmp_path / "b")).eval()
    ids, mask, pixels, sizes = _batch(ours.config, SIZES[:2])
    with torch.no_grad():
        ref = back(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=mask).logits
    got = ours.logits(ids, pixels, attention_mask=mask, image_sizes=sizes)
    assert (got - ref)[mask.bool()].abs().max().item() <= 1e-4


WORDS = ["user", "assistant", ":", "?", ".", "what", "is", "in", "the", "picture", "describe", "it"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    hf = tiny_llava(pinpoints=PINPOINTS, seed=7)
    path = save_checkpoint(hf, tmp_path_factory.mktemp("next-tok"), "original")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return hf, fastllava.load(path, device="cpu")


def test_generate_end_to_end_with_our_processing(next_model):
    hf, ours = next_model
    images = [_photo(40, 160, 0), _photo(160, 40, 1), _photo(50, 50, 2), None]
    prompts = ["describe it .", "what is in the picture ?", "what is it ?", "describe the picture ."]
    out = ours.generate(images=images, prompts=prompts, max_new_tokens=12)
    tokens = [r.stats["image_tokens"] for r in out]
    assert tokens == [ours.config.image_tokens(h, w) for h, w in ((40, 160), (160, 40), (50, 50))] + [0]
    assert len(set(tokens[:3])) == 3  # the count depends on the image's size
    inputs = ours.inputs(images, prompts)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == tokens
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    eos = ours.config.text.eos_token_id
    for r, row in zip(out, ref.tolist()):
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert r.token_ids == row[:cut]


def test_next_refusals(next_model, tmp_path):
    _, ours = next_model
    with pytest.raises(fastllava.UserError, match="LLaVA-NeXT"):
        ours.generate(images=[_photo(40, 160, 0)], prompts=["describe it ."], reduce="pool:keep=8")
    ids, mask, pixels, sizes = _batch(ours.config, SIZES[:1])
    with pytest.raises(fastllava.UserError, match="image_sizes"):
        ours.logits(ids, pixels, attention_mask=mask)
    with pytest.raises(fastllava.UserError, match="Llava.inputs"):
        ours.encode([_photo(40, 160, 0)], ["describe it ."])
    with pytest.raises(fastllava.UserError, match="pad_to_square"):
        fastllava.load(ours.path, device="cpu", pad_to_square=True)
    cfg = json.loads((ours.path / "config.json").read_text())
    for change, message in ((dict(image_grid_pinpoints=[[32, 50]]), "multiple"),
                            (dict(vision_feature_select_strategy="full"), "default")):
        bad = tmp_path / message
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        (bad / "model.safetensors").write_bytes((ours.path / "model.safetensors").read_bytes())
        with pytest.raises(fastllava.UserError, match=message):
            fastllava.load(bad, device="cpu")


def test_bench_next_preset_matches_transformers(tmp_path):
    from fastllava.cli import main

    out = tmp_path / "b"
    assert main(["bench", "--preset", "tiny-next", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "3", "--text-tokens", "8", "--compare", "hf", "--out", str(out)]) == 0
    case = json.loads((out / "bench.json").read_text())["cases"][0]
    assert case["visual_tokens"] == 576 + 48 * 49  # a 672 x 672 image: base + 2 x 2 tiles, 48 rows + newlines
    assert case["same_tokens"] is True


def test_quantized_weights_and_kv_cache_run_on_next(next_model):
    _, fp = next_model
    images, prompts = [_photo(40, 160, 0), _photo(50, 50, 1)], ["describe it .", "what is it ?"]
    inputs = fp.inputs(images, prompts)
    real = inputs["attention_mask"].bool()
    int8 = fastllava.load(fp.path, device="cpu", weights="int8", kv_cache="kivi:bits=4,group=16,residual=16")
    assert (int8.logits(**inputs) - fp.logits(**inputs))[real].abs().max().item() < 0.05
    out = int8.generate(images=images, prompts=prompts, max_new_tokens=6)
    assert [r.stats["image_tokens"] for r in out] == (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    assert out[0].stats["kv_cache_bytes"] < fp.generate(images=images, prompts=prompts, max_new_tokens=6)[0].stats[
        "kv_cache_bytes"]
