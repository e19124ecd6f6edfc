"""LLaVA-OneVision (SigLIP tower, Qwen2 decoder, AnyRes with anyres_max_N) against transformers'
LlavaOnevisionForConditionalGeneration and LlavaOnevisionImageProcessor on tiny random models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava import anyres
from fastllava.images import OnevisionProcessor
from hf_reference import IMAGE_TOKEN, ONEVISION_PINPOINTS, VIDEO_TOKEN, save_checkpoint, tiny_onevision

# (height, width) before preprocessing: 1:5 and 5:1, square, odd sizes that unpad unevenly, and
# large ones whose tile grids are scaled down (anyres_max_9)
SIZES = [(40, 200), (200, 40), (50, 50), (37, 91), (300, 280), (190, 120)]
PROCESSOR = {"size": {"height": 32, "width": 32}, "image_grid_pinpoints": ONEVISION_PINPOINTS, "do_pad": True,
             "resample": 3}

CONFIGS = {
    # name: (tiny_onevision kwargs, key layout)
    "untied-saved": (dict(kv_heads=2), "saved"),
    "tied-mha-layer-2-original": (dict(kv_heads=4, tie=True, feature_layer=-2), "original"),
}


def _photo(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _hf_processor(**overrides):
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(**{**PROCESSOR, **overrides})


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs, layout = CONFIGS[request.param]
    hf = tiny_onevision(seed=5, **kwargs)
    path = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout)
    return request.param, hf, fastllava.load(path, device="cpu", dtype="float32")


def _rows(parts: list[torch.Tensor]):
    """Left-padded ids and mask of rows made of the given pieces each."""
    rows = [torch.cat(p) for p in parts]
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
    return ids, mask


def _batch(cfg, sizes, seed=1):
    """One left-padded row per image: BOS, text, the image's tokens, text; pixel_values and
    image_sizes from transformers' processor."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, (h, w) in enumerate(sizes):
        before = torch.randint(3, IMAGE_TOKEN, (1 + i % 3,), generator=g)
        after = torch.randint(3, IMAGE_TOKEN, (4,), generator=g)
        parts.append([torch.tensor([1]), before, torch.full((cfg.image_tokens(h, w),), IMAGE_TOKEN), after])
    ids, mask = _rows(parts)
    out = _hf_processor()(images=[_photo(h, w, i) for i, (h, w) in enumerate(sizes)], return_tensors="pt")
    return ids, mask, out["pixel_values"], out["image_sizes"]


def test_sizes_cover_scaled_down_and_extreme_grids():
    """The sizes under test include grids scaled down by anyres_max_9 and the 1:5 and 5:1 ones."""
    scaled = []
    for h, w in SIZES:
        rows, cols = anyres.tile_grid((h, w), ONEVISION_PINPOINTS, 32)
        ys, xs = anyres.unpadded_box((h, w), (rows * 4, cols * 4))
        grid = (ys.stop - ys.start, xs.stop - xs.start)
        scaled.append(anyres.scaled_grid(grid, 4, 9) != grid)
    assert sum(scaled) >= 2 and not all(scaled)


def test_token_counts_match_transformers_processor():
    from transformers import LlavaOnevisionProcessor

    from fastllava.config import LlavaConfig

    cfg = LlavaConfig.from_dict({"model_type": "llava_onevision"})  # transformers' defaults: 384, 27 x 27
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # only its token arithmetic is used
    proc.image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]})()
    proc.num_image_tokens, proc.vision_aspect_ratio = 27 * 27, "anyres_max_9"
    sizes = np.random.default_rng(0).integers(1, 4000, (300, 2)).tolist() + [[384, 1920], [1920, 384], [1, 100]]
    for h, w in sizes:
        assert cfg.image_tokens(h, w) == proc._get_number_of_features(h, w, 384, 384), (h, w)
    assert cfg.video_tokens(8) == 8 * 14 * 14 + 1


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


def test_image_features_match_transformers(pair):
    """The packed visual tokens themselves (unpadding, bilinear scaling, newlines) before the decoder."""
    name, hf, ours = pair
    _, _, pixels, sizes = _batch(ours.config, SIZES)
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(pixels, sizes, vision_feature_layer=hf.config.vision_feature_layer,
                                                    vision_feature_select_strategy="full").pooler_output)
        got = ours.model.image_features(pixels, sizes)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5, name


def test_greedy_tokens_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pixels, sizes = _batch(ours.config, [SIZES[0], SIZES[4]], seed=2)  # a batch of two prompts
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=mask,
                          max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate_ids(ids, pixels, attention_mask=mask, image_sizes=sizes, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(got, ref), f"{name}:\n{got}\n{ref}"


def test_flat_tiles_equal_padded_tiles(pair):
    _, _, ours = pair
    ids, mask, pixels, sizes = _batch(ours.config, SIZES[:3])
    counts = [anyres.tile_grid(tuple(s), ONEVISION_PINPOINTS, 32) for s in sizes.tolist()]
    flat = torch.cat([p[:r * c + 1] for p, (r, c) in zip(pixels, counts)])
    a = ours.logits(ids, pixels, attention_mask=mask, image_sizes=sizes)
    b = ours.logits(ids, flat, attention_mask=mask, image_sizes=sizes)
    assert torch.equal(a, b)


def test_video_logits_match_transformers(pair):
    """Videos at the model level: frames through the tower, 2 x 2 bilinear pooling per frame, one
    newline after the video; a prompt with an image and a video beside one with a video only."""
    name, hf, ours = pair
    cfg, model = ours.config, ours.model
    g = torch.Generator().manual_seed(3)
    videos = torch.randn(2, 3, 3, 32, 32, generator=g)  # 2 videos of 3 frames
    _, _, pixels, sizes = _batch(cfg, [SIZES[0]])
    text = lambda n: torch.randint(3, IMAGE_TOKEN, (n,), generator=g)  # noqa: E731
    video = torch.full((cfg.video_tokens(3),), VIDEO_TOKEN)
    image = torch.full((cfg.image_tokens(*SIZES[0]),), IMAGE_TOKEN)
    ids, mask = _rows([[torch.tensor([1]), text(2), image, text(1), video, text(3)],
                       [torch.tensor([1]), video, text(5)]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes, pixel_values_videos=videos,
                 attention_mask=mask).logits
        embeds = model.embed(ids, model.image_features(pixels, sizes), model.encode_videos(videos))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        got = model(embeds, positions, mask.bool())
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"


@pytest.mark.parametrize("tile", [32, 384])
def test_processing_matches_llava_onevision_image_processor(tmp_path, tile):
    pinpoints = [[h // 32 * tile, w // 32 * tile] for h, w in ONEVISION_PINPOINTS]  # transformers' defaults at 384
    cfg = {**PROCESSOR, "size": {"height": tile, "width": tile}, "image_grid_pinpoints": pinpoints,
           "crop_size": None, "do_center_crop": None}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = OnevisionProcessor.from_dir(tmp_path, [tuple(p) for p in pinpoints], tile)
    sizes = [(h * tile // 32, w * tile // 32) for h, w in SIZES[:4]] + [(480, 640), (333, 500), (1000, 200)]
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    expected = _hf_processor(**cfg)(images=images, return_tensors="pt")
    pixels, image_sizes = ours(images)
    assert torch.equal(image_sizes, expected["image_sizes"])
    assert pixels.shape == expected["pixel_values"].shape
    assert (pixels - expected["pixel_values"]).abs().max().item() <= 1e-5


def test_several_images_in_one_prompt_match_transformers(pair, tmp_path):
    """A prompt with two images (each untiled: its thumbnail padded to a square, one newline) beside
    one with a single tiled image, as transformers' batch_num_images says."""
    name, hf, ours = pair
    cfg = ours.config
    sizes = [(40, 200), (90, 60), (300, 280)]
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)]
    expected = _hf_processor()(images=[images[:2], images[2:]], return_tensors="pt")
    assert expected["batch_num_images"].tolist() == [2, 1]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    pixels, image_sizes = OnevisionProcessor.from_dir(tmp_path, cfg.image_grid_pinpoints, 32)(images, [2, 1])
    assert torch.equal(image_sizes, expected["image_sizes"])
    assert pixels.shape == expected["pixel_values"].shape
    assert (pixels - expected["pixel_values"]).abs().max().item() <= 1e-5
    g = torch.Generator().manual_seed(4)
    text = lambda n: torch.randint(3, IMAGE_TOKEN, (n,), generator=g)  # noqa: E731
    image = lambda i, tiled: torch.full((cfg.image_tokens(*sizes[i], tiled=tiled),), IMAGE_TOKEN)  # noqa: E731
    assert cfg.image_tokens(*sizes[0], tiled=False) == 4 * 4 + 1
    ids, mask = _rows([[torch.tensor([1]), text(2), image(0, False), text(1), image(1, False), text(3)],
                       [torch.tensor([1]), text(1), image(2, True), text(2)]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_sizes=image_sizes, batch_num_images=[2, 1],
                 attention_mask=mask).logits
        feats = ours.model.image_features(pixels, image_sizes, batch_num_images=[2, 1])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        got = ours.model(ours.model.embed(ids, feats), positions, mask.bool())
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    with pytest.raises(fastllava.UserError, match="batch_num_images"):
        ours.model.image_features(pixels, image_sizes, batch_num_images=[1, 1])


def test_config_defaults_and_refusals(tmp_path):
    from fastllava.config import LlavaConfig

    cfg = LlavaConfig.from_dict({"model_type": "llava_onevision"})
    assert cfg.is_onevision and cfg.is_next and cfg.vision.model_type == "siglip" and not cfg.vision.class_token
    vision = cfg.vision
    assert (vision.image_size, vision.num_hidden_layers, vision.hidden_act) == (384, 26, "gelu_pytorch_tanh")
    assert cfg.text.model_type == "qwen2" and cfg.text.qkv_bias and not cfg.text.attention_bias
    assert cfg.vision_feature_layers == [-1] and cfg.vision_feature_select_strategy == "full"
    assert cfg.max_tiles == 9 and len(cfg.image_grid_pinpoints) == 36 and cfg.image_features_per_image == 27 * 27
    assert (cfg.image_token_index, cfg.video_token_index) == (151646, 151647)
    llama = LlavaConfig.from_dict({"text_config": {"model_type": "llama", "qkv_bias": True}})
    assert not llama.text.qkv_bias  # the Llama path never takes Qwen2's biases
    for change, message in ((dict(vision_feature_select_strategy="default"), "full"),
                            (dict(vision_aspect_ratio="pad"), "anyres_max"),
                            (dict(vision_config={"model_type": "clip_vision_model"}), "SigLIP"),
                            (dict(text_config={"model_type": "qwen2", "use_sliding_window": True}), "sliding")):
        with pytest.raises(fastllava.UserError, match=message):
            LlavaConfig.from_dict({"model_type": "llava_onevision", **change})


def test_save_model_refuses_onevision(pair, tmp_path):
    from fastllava.checkpoint import save_model

    with pytest.raises(fastllava.UserError, match="OneVision"):
        save_model(pair[2].model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


WORDS = ["user", "assistant", ":", "?", ".", "what", "is", "in", "the", "picture", "describe", "it"]


@pytest.fixture(scope="module")
def ov_model(tmp_path_factory):
    from fastllava.evaluation.tokenizer import build_word_tokenizer
    from hf_reference import VOCAB

    hf = tiny_onevision(seed=7)
    path = save_checkpoint(hf, tmp_path_factory.mktemp("ov-tok"))
    words = WORDS + [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]
    build_word_tokenizer(words, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    _hf_processor().save_pretrained(path)  # preprocessor_config.json as transformers writes it
    return hf, fastllava.load(path, device="cpu")


def test_generate_end_to_end_with_our_processing(ov_model):
    hf, ours = ov_model
    sizes = [(40, 200), (200, 40), (300, 280)]
    images = [_photo(h, w, i) for i, (h, w) in enumerate(sizes)] + [None]
    prompts = ["describe it .", "what is in the picture ?", "what is it ?", "describe the picture ."]
    out = ours.generate(images=images, prompts=prompts, max_new_tokens=12)
    tokens = [r.stats["image_tokens"] for r in out]
    assert tokens == [ours.config.image_tokens(h, w) for h, w in sizes] + [0]
    inputs = ours.inputs(images, prompts)
    expected = _hf_processor()(images=images[:3], return_tensors="pt")
    assert torch.equal(inputs["image_sizes"], expected["image_sizes"])
    assert (inputs["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = ref[:, inputs["input_ids"].shape[1]:]
    eos = ours.config.text.eos_token_id
    for r, row in zip(out, ref.tolist()):
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert r.token_ids == row[:cut]


def test_static_decode_matches_eager(ov_model):
    _, eager = ov_model
    images, prompts = [_photo(40, 200, 0), _photo(300, 280, 1)], ["describe it .", "what is it ?"]
    static = fastllava.load(eager.path, device="cpu", decode="static")
    assert ([r.token_ids for r in static.generate(images=images, prompts=prompts, max_new_tokens=8)]
            == [r.token_ids for r in eager.generate(images=images, prompts=prompts, max_new_tokens=8)])


def test_quantized_weights_and_kv_cache_run_on_onevision(ov_model):
    _, fp = ov_model
    inputs = fp.inputs([_photo(40, 200, 0), _photo(50, 50, 1)], ["describe it .", "what is it ?"])
    real = inputs["attention_mask"].bool()
    int8 = fastllava.load(fp.path, device="cpu", weights="int8", kv_cache="kivi:bits=4,group=16,residual=16")
    assert (int8.logits(**inputs) - fp.logits(**inputs))[real].abs().max().item() < 0.05


def test_class_token_methods_are_refused_and_the_others_run_on_siglip(ov_model):
    """SigLIP has no class token: methods that read its attention are a one-line error before any
    work; the methods that need none run, with exact budgets."""
    _, ours = ov_model
    image = _photo(40, 200, 3)
    for spec in ("fastervlm:keep=20", "visionzip:keep=20", "vispruner:keep=20", "hired:keep=20"):
        with pytest.raises(fastllava.UserError, match="has no class token"):
            ours.generate(images=[image], prompts=["describe it ."], max_new_tokens=2, reduce=spec)
    for spec in ("divprune:keep=20", "mmtok:keep=20", "fastv:keep=20,layer=1"):
        out = ours.generate(images=[image], prompts=["describe it ."], max_new_tokens=2, reduce=spec)[0]
        assert out.stats["visual_tokens"][-1] == 20
