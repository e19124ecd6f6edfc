"""LLaVA-NeXT-Video (CLIP tower, LLaVA-NeXT's AnyRes images, videos pooled per frame) against
transformers' LlavaNextVideoForConditionalGeneration on tiny random models: logits and greedy
tokens for videos of 1, 4 and 8 frames, images of extreme aspect ratios, an image and a video in
one prompt; the three pooling modes; both key layouts; the processors; generate/stream/run with
videos; the features (reduction, quantization, decode modes) on the new model."""

import json

import numpy as np
import pytest
import torch
from hf_reference import (
    IMAGE_TOKEN,
    PINPOINTS,
    VIDEO_TOKEN,
    _rename,
    _runtime_state,
    save_checkpoint,
    tiny_next_video,
)
from PIL import Image
from test_onevision import _photo
from test_video import _clip, _hf_tokens, _same_tokens, _tokenizer

import fastllava
from fastllava.cli import main
from fastllava.config import LlavaConfig
from fastllava.images import VideoProcessor
from fastllava.prompts import Turn

TOWER = 48  # the tiny tower's image size: 6 x 6 features per piece (8-pixel patches)
NEXT_PINPOINTS = [[h // 32 * TOWER, w // 32 * TOWER] for h, w in PINPOINTS]
PROCESSOR = {"size": {"shortest_edge": TOWER}, "crop_size": {"height": TOWER, "width": TOWER}, "resample": 3,
             "image_grid_pinpoints": NEXT_PINPOINTS, "do_pad": True}
# what LlavaNextVideoVideoProcessor.save_pretrained writes for this tower (its defaults, 224 pixels, replaced)
VIDEO_PROCESSOR = {"video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": TOWER},
                   "crop_size": {"height": TOWER, "width": TOWER}, "do_resize": True, "do_center_crop": True,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "default_to_square": False,
                   "do_sample_frames": False}
# the form of the released checkpoints' (vicuna) chat template: images, then videos, then the text
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CONFIGS = {
    # name: (tiny_next_video kwargs, key layout)
    "average-llama-saved": (dict(pool="average", stride=2), "saved"),
    "max-mistral-gqa-layers-new": (dict(pool="max", stride=4, text="mistral", kv_heads=2, sliding_window=40,
                                        feature_layer=[-3, -1]), "new"),
    "conv-tied-saved": (dict(pool="conv", stride=2, tie=True), "saved"),
}
# (height, width) of the test images: 1:5, 5:1, square, odd
SIZES = [(40, 200), (200, 40), (50, 50), (37, 91)]


def _hf_image_processor(**overrides):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(**{**PROCESSOR, **overrides})


def _checkpoint(hf, path, layout="saved", shards=1):
    path = save_checkpoint(hf, path, layout, shards)
    _tokenizer(path)
    _hf_image_processor().save_pretrained(path)
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs, layout = CONFIGS[request.param]
    hf = tiny_next_video(seed=3, image_size=TOWER, **kwargs)
    path = _checkpoint(hf, tmp_path_factory.mktemp(request.param), layout)
    return request.param, hf, fastllava.load(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """One NeXT-Video checkpoint (average pooling) for the features and the CLI."""
    path = _checkpoint(tiny_next_video(seed=9, image_size=TOWER), tmp_path_factory.mktemp("next-video"))
    return fastllava.load(path, device="cpu")


def _hf(hf, **inputs):
    with torch.no_grad():
        return hf(**{k: v for k, v in inputs.items() if v is not None}).logits


def _close(ours, ref, mask):
    real = mask.bool()
    assert ours.shape == ref.shape
    assert ref[real].std() > 1e-2
    return (ours[real] - ref[real]).abs().max().item()


def test_config_reads_the_pooling_and_counts_tokens(pair):
    name, hf, ours = pair
    cfg = ours.config
    assert cfg.is_next_video and cfg.is_next and cfg.takes_videos and not cfg.is_onevision
    assert cfg.spatial_pool_mode == hf.config.spatial_pool_mode
    side = 6 // cfg.spatial_pool_stride  # 3 at stride 2, 1 at stride 4 (floor: the last 2 rows and columns dropped)
    assert cfg.video_tokens(8) == 8 * side * side
    with torch.no_grad():  # transformers' own count: the features its get_video_features returns
        feats = hf.model.get_video_features(torch.randn(1, 3, 3, TOWER, TOWER)).pooler_output
    assert feats.shape[1] == cfg.video_tokens(3)
    defaults = LlavaConfig.from_dict({"model_type": "llava_next_video"})  # transformers' defaults
    assert (defaults.image_token_index, defaults.video_token_index) == (32001, 32000)
    assert defaults.video_tokens(32) == 32 * 12 * 12 and defaults.spatial_pool_mode == "average"


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_video_logits_and_greedy_tokens_match_transformers(pair, frames):
    """A left-padded batch of two video prompts of `frames` frames: float32 logits within 1e-4,
    the same 12 greedy tokens."""
    name, hf, ours = pair
    videos = [_clip(max(frames, 10), 40, 56, 1), _clip(frames, 60, 30, 2)]
    prompts = ["describe it .", "what is in the picture ?"]
    inputs = ours.inputs([None, None], prompts, videos, num_frames=frames)
    assert inputs["pixel_values_videos"].shape == (2, frames, 3, TOWER, TOWER)
    assert ((inputs["input_ids"] == VIDEO_TOKEN).sum(1) == ours.config.video_tokens(frames)).all()
    diff = _close(ours.logits(**inputs), _hf(hf, **inputs), inputs["attention_mask"])
    assert diff <= 1e-4, f"{name}, {frames} frames: max |logit diff| {diff}"
    ref = _hf_tokens(hf, inputs, 12)
    out = ours.generate(prompts=prompts, videos=videos, num_frames=frames, max_new_tokens=12)
    _same_tokens(out, ref, ours.config.text.eos_token_id)
    assert [r.stats["video_tokens"] for r in out] == [ours.config.video_tokens(frames)] * 2


def test_image_logits_match_transformers(pair):
    """Images of aspect ratios 1:5, 5:1, 1:1 and 37:91 in one batch (AnyRes tiles, image_newline),
    pixel values from transformers' LlavaNextImageProcessor."""
    name, hf, ours = pair
    images = [_photo(h, w, i) for i, (h, w) in enumerate(SIZES)]
    prompts = ["describe it .", "what is it ?", "what is in the picture ?", "describe the picture ."]
    inputs = ours.inputs(images, prompts)
    expected = _hf_image_processor()(images=images, return_tensors="pt")
    assert torch.equal(inputs["image_sizes"], expected["image_sizes"])
    assert (inputs["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-5
    counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    assert counts == [ours.config.image_tokens(h, w) for h, w in SIZES] and len(set(counts)) == 4
    diff = _close(ours.logits(**inputs), _hf(hf, **inputs), inputs["attention_mask"])
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    out = ours.generate(images=images, prompts=prompts, max_new_tokens=10)
    _same_tokens(out, _hf_tokens(hf, inputs, 10), ours.config.text.eos_token_id)


def test_image_and_video_in_one_prompt_match_transformers(pair):
    """An image and a video in one prompt (the image's tokens first), next to a video-only prompt
    and an image-only one: the chat template's placeholders, logits within 1e-4, greedy tokens."""
    name, hf, ours = pair
    images, videos = [_photo(40, 200, 7), None, _photo(90, 60, 8)], [_clip(9, 50, 50, 3), _clip(5, 32, 64, 4), None]
    prompts = ["is the photo in the clip ?", "describe it .", "what is it ?"]
    text = ours.prompts.format_turns([Turn("user", prompts[0], 1, 1)])
    assert text == "USER: <image>\n<video>\nis the photo in the clip ? ASSISTANT:"
    inputs = ours.inputs(images, prompts, videos, num_frames=4)
    ids = inputs["input_ids"][0]
    first_video = int((ids == VIDEO_TOKEN).nonzero()[0])
    assert int((ids == IMAGE_TOKEN).nonzero()[-1]) < first_video  # the image's tokens come first
    diff = _close(ours.logits(**inputs), _hf(hf, **inputs), inputs["attention_mask"])
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    out = ours.generate(images=images, prompts=prompts, videos=videos, num_frames=4, max_new_tokens=10)
    _same_tokens(out, _hf_tokens(hf, inputs, 10), ours.config.text.eos_token_id)
    stream = ours.stream(image=images[0], video=videos[0], prompt=prompts[0], num_frames=4, max_new_tokens=10)
    assert "".join(stream) == out[0].text and stream.result.token_ids == out[0].token_ids


def test_both_layouts_and_a_bare_resampler_key_load_the_same_weights(tmp_path):
    """A conv-pooled model saved by save_pretrained, in the transformers >= 4.52 layout, in the
    original llava-hf layout with the resampler under `vision_resampler.` (a key transformers 5
    would leave unread), and sharded: the same logits."""
    from safetensors.torch import save_file

    hf = tiny_next_video(seed=4, image_size=TOWER, pool="conv")
    paths = [_checkpoint(hf, tmp_path / "saved"), _checkpoint(hf, tmp_path / "new", "new"),
             _checkpoint(hf, tmp_path / "sharded", "original", shards=3)]
    bare = _checkpoint(hf, tmp_path / "bare", "original")
    state = _rename(_runtime_state(hf), [("model.vision_resampler.", "vision_resampler."),
                                         ("model.language_model.", "language_model.model."),
                                         ("lm_head.", "language_model.lm_head."),
                                         ("model.vision_tower.", "vision_tower.vision_model."),
                                         ("model.multi_modal_projector.", "multi_modal_projector."),
                                         ("model.image_newline", "image_newline")])
    assert "vision_resampler.pool.weight" in state
    save_file(state, str(bare / "model.safetensors"), metadata={"format": "pt"})
    paths.append(bare)
    models = [fastllava.load(p, device="cpu") for p in paths]
    inputs = models[0].inputs([_photo(40, 60, 0)], ["is the photo in the clip ?"], [_clip(6, 40, 40, 5)], num_frames=3)
    outs = [m.logits(**inputs) for m in models]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert _close(outs[0], _hf(hf, **inputs), inputs["attention_mask"]) <= 1e-4


def test_video_processing_follows_transformers(tmp_path):
    """Frames sampled as transformers' default_sample_indices_fn, each resized on its shortest
    edge, center-cropped, rescaled and normalized as LlavaNextVideoVideoProcessor does (checked
    against transformers' CLIPImageProcessorPil, the same steps with PIL: torchvision, which
    transformers' video processors need, is not installed here) within 1e-5."""
    from transformers import CLIPImageProcessorPil
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**VIDEO_PROCESSOR, "num_frames": 6}))
    image = fastllava.images.AnyresProcessor.from_dir(tmp_path, [tuple(p) for p in NEXT_PINPOINTS], TOWER).pieces
    ours = VideoProcessor.from_dir(tmp_path, image, next_video=True)
    assert ours.num_frames == 6
    reference = CLIPImageProcessorPil(size={"shortest_edge": TOWER}, crop_size={"height": TOWER, "width": TOWER})
    for frames, (h, w) in ((17, (40, 200)), (6, (90, 60)), (3, (48, 48))):
        video = _clip(frames, h, w, frames)
        idx = default_sample_indices_fn(VideoMetadata(total_num_frames=frames), num_frames=min(6, frames))
        expected = reference(images=[Image.fromarray(video[i]) for i in idx], return_tensors="pt")["pixel_values"]
        for clip in ours([video, list(video)]):
            assert clip.shape == expected.shape
            assert (clip - expected).abs().max().item() <= 1e-5
    # without a video processor config: the image processor's per-piece settings (resize, crop)
    (tmp_path / "video_preprocessor_config.json").unlink()
    plain = VideoProcessor.from_dir(tmp_path, image, next_video=True)
    assert plain.num_frames == 8 and plain.frames.crop_hw == (TOWER, TOWER)
    # a config that leaves size and crop out: the tower's, not the class's 224
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "x"}))
    bare = VideoProcessor.from_dir(tmp_path, image, next_video=True)
    assert (bare.frames.shortest_edge, bare.frames.crop_hw) == (TOWER, (TOWER, TOWER))


def test_features_run_or_refuse_in_one_line(model):
    """On a NeXT-Video checkpoint: image-token reductions (before and inside the LLM) run on image
    prompts; a class-token or in-tower reduction with a video is a one-line error; int8 weights, KIVI and
    VidKV caches, int4 weights, bfloat16, static and compiled decoding run with videos."""
    fp = model
    image, video = _photo(40, 200, 1), _clip(8, 40, 40, 2)
    for spec in ("fastervlm:keep=12", "visionzip:keep=12", "fastv:keep=12,layer=1", "dart:keep=12,layer=1"):
        out = fp.generate(images=[image], prompts=["describe it ."], reduce=spec, max_new_tokens=4)[0]
        assert out.stats["reduce"] and len(out.token_ids) >= 1, spec
    for kwargs, message in ((dict(reduce="fastervlm:keep=8"), "class-token attention, which a video's pooled"),
                            (dict(reduce="pitome:keep=8"), "inside the vision tower"),
                            (dict(num_frames=0), "num_frames")):
        with pytest.raises(fastllava.UserError, match=message) as e:
            fp.generate(prompts=["describe it ."], videos=[video], max_new_tokens=2, **{"num_frames": 4, **kwargs})
        assert "\n" not in str(e.value)
    kwargs = dict(images=[image, None], prompts=["is the photo in the clip ?", "describe it ."],
                  videos=[video, _clip(5, 30, 50, 3)], num_frames=4, max_new_tokens=8)
    inputs = fp.inputs(kwargs["images"], kwargs["prompts"], kwargs["videos"], num_frames=4)
    real = inputs["attention_mask"].bool()
    expected = [r.token_ids for r in fp.generate(**kwargs)]
    int8 = fastllava.load(fp.path, device="cpu", weights="int8")
    assert (int8.logits(**inputs) - fp.logits(**inputs))[real].abs().max().item() < 0.05
    assert [len(r.token_ids) for r in int8.generate(**kwargs)] == [len(t) for t in expected]
    for options in (dict(weights="int4:group=16"), dict(dtype="bfloat16")):
        out = fastllava.load(fp.path, device="cpu", **options).generate(**kwargs)
        assert [r.stats["video_tokens"] for r in out] == [fp.config.video_tokens(4)] * 2 and out[0].token_ids
    for cache in ("kivi:bits=4,group=16,residual=16", "vidkv:group=16,residual=16"):
        quant = fastllava.load(fp.path, device="cpu", kv_cache=cache)
        out = quant.generate(**kwargs)
        assert out[0].stats["kv_cache_bytes"] < fp.generate(**kwargs)[0].stats["kv_cache_bytes"], cache
    for mode in ("static", "compiled"):
        other = fastllava.load(fp.path, device="cpu", decode=mode)
        assert [r.token_ids for r in other.generate(**kwargs)] == expected, mode


def test_speculation_with_videos_gives_the_plain_tokens(model):
    """ngram, layerskip and a draft model (itself, seeing the video or not) on a batch of a video
    prompt, an image + video prompt and a text prompt: the plain greedy tokens."""
    kwargs = dict(images=[None, _photo(40, 200, 1), None], prompts=["describe it .", "is it in the clip ?", "red red"],
                  videos=[_clip(8, 40, 40, 2), _clip(5, 30, 50, 3), None], num_frames=4, max_new_tokens=12)
    plain = [r.token_ids for r in model.generate(**kwargs)]
    for spec in ("ngram:k=3", "layerskip:k=2", f"draft:model={model.path},k=3", f"draft:model={model.path},image=0"):
        out = model.generate(**kwargs, speculate=spec)
        assert [r.token_ids for r in out] == plain, spec
        assert sum(r.stats["speculate"]["draft_tokens"] for r in out) > 0, spec


def test_vidkv_counts_video_tokens_as_visual(model):
    """VidKV's salient values are chosen among the visual tokens: a video's tokens are visual too."""
    quant = fastllava.load(model.path, device="cpu", kv_cache="vidkv:group=16,residual=16,salient=0.25")
    inputs = quant.inputs([None], ["describe it ."], [_clip(8, 40, 40, 2)], num_frames=4)
    with torch.inference_mode():
        _, _, cache = quant.runner.prefill(inputs["input_ids"], inputs["attention_mask"], None, 4,
                                           pixel_values_videos=inputs["pixel_values_videos"])
    videos = int((inputs["input_ids"] == quant.config.video_token_index).sum())
    assert videos == quant.config.video_tokens(4) > 0
    slots = cache.salient[0].slots[0]  # [k] the salient slots of the one row
    assert len(slots) == round(0.25 * videos)
    assert bool((inputs["input_ids"][0, slots] == quant.config.video_token_index).all())


def test_refusals(tmp_path):
    base = {"model_type": "llava_next_video", "vision_config": {"hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 48, "patch_size": 8},
            "text_config": {"hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "vocab_size": 128}}
    for change, message in ((dict(spatial_pool_mode="bilinear"), "spatial_pool_mode"),
                            (dict(spatial_pool_stride=0), "spatial_pool_stride"),
                            (dict(spatial_pool_stride=7), "at most 6"),
                            (dict(spatial_pool_mode="conv", vision_feature_layer=[-2, -1]), "conv"),
                            (dict(spatial_pool_mode="conv", spatial_pool_out_channels=16), "conv"),
                            (dict(vision_feature_select_strategy="full"), "default")):
        with pytest.raises(fastllava.UserError, match=message) as e:
            LlavaConfig.from_dict({**base, **change})
        assert "\n" not in str(e.value)


def test_save_model_loads_in_transformers(tmp_path):
    """save_model writes a checkpoint (conv pooling weights included) that transformers'
    LlavaNextVideoForConditionalGeneration loads to the logits of the model it came from."""
    from transformers import LlavaNextVideoForConditionalGeneration

    hf = tiny_next_video(seed=11, image_size=TOWER, pool="conv", feature_layer=-1)
    ours = fastllava.load(_checkpoint(hf, tmp_path / "in"), device="cpu")
    saved = fastllava.checkpoint.save_model(ours.model, tmp_path / "out")
    again = LlavaNextVideoForConditionalGeneration.from_pretrained(saved).eval()
    assert again.config.spatial_pool_mode == "conv" and again.config.video_token_index == VIDEO_TOKEN
    inputs = ours.inputs([_photo(40, 200, 0), None], ["is the photo in the clip ?", "describe it ."],
                         [_clip(6, 40, 40, 1), _clip(4, 40, 40, 2)], num_frames=4)
    assert _close(ours.logits(**inputs), _hf(again, **inputs), inputs["attention_mask"]) <= 1e-4


def test_cli_run_with_a_video(model, tmp_path, capsys):
    ours = model
    video = _clip(7, 40, 40, 8)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    np.save(tmp_path / "clip.npy", video)
    expected = ours.generate(prompts=["describe it ."], videos=[video], num_frames=3, max_new_tokens=6)[0]
    for source in (folder, tmp_path / "clip.npy"):
        code = main(["run", "--model", str(ours.path), "--device", "cpu", "--video", str(source), "--num-frames", "3",
                     "--prompt", "describe it .", "--max-new-tokens", "6", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["text"] == expected.text
        assert out["stats"]["video_tokens"] == ours.config.video_tokens(3) == 27


def _write_mp4(path, video: np.ndarray) -> None:
    """video [T, H, W, 3] uint8 as an MPEG-4 file (lossy), with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_video_file_through_pyav(model, tmp_path, capsys):
    """An mp4 file (the fastllava[video] extra) gives the tokens of its own decoded frames, through
    generate and `run --video`."""
    import av

    ours = model
    _write_mp4(tmp_path / "clip.mp4", _clip(11, 40, 56, 9))
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(decoded) == 11
    expected = ours.generate(prompts=["describe it ."], videos=[decoded], num_frames=4, max_new_tokens=6)[0]
    got = ours.generate(prompts=["describe it ."], videos=[tmp_path / "clip.mp4"], num_frames=4, max_new_tokens=6)[0]
    assert got.token_ids == expected.token_ids and got.stats["video_tokens"] == ours.config.video_tokens(4)
    assert main(["run", "--model", str(ours.path), "--device", "cpu", "--video", str(tmp_path / "clip.mp4"),
                 "--num-frames", "4", "--prompt", "describe it .", "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected.text


def test_bench_next_video_preset_matches_transformers(tmp_path):
    """`bench --preset tiny-next-video` (the shapes of llava-next-video-7b, scaled down) builds the
    NeXT-Video model and times its image path against transformers: the same greedy tokens."""
    out = tmp_path / "b"
    assert main(["bench", "--preset", "tiny-next-video", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "3", "--text-tokens", "8", "--compare", "hf", "--out", str(out)]) == 0
    case = json.loads((out / "bench.json").read_text())["cases"][0]
    assert case["visual_tokens"] == 576 + 48 * 49 and case["same_tokens"] is True
    from fastllava.bench.presets import preset_config

    cfg = preset_config("llava-next-video-7b")
    assert cfg.is_next_video and cfg.video_tokens(32) == 32 * 144 and cfg.image_tokens(672, 672) == 2928
