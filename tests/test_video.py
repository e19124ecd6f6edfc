"""Videos end to end on LLaVA-OneVision: frame sampling and preprocessing, `generate` and
`stream` with videos against transformers' LlavaOnevisionForConditionalGeneration on a tiny
random model, the refusals, and `fastllava run --video`."""

import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from hf_reference import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VOCAB,
    save_checkpoint,
    tiny_llava,
    tiny_onevision,
)
from PIL import Image
from test_onevision import WORDS, _hf_processor, _photo

import fastllava
from fastllava.cli import main
from fastllava.images import (
    CLIP_MEAN,
    CLIP_STD,
    VideoTooLarge,
    check_video_path,
    load_video,
    load_video_bytes,
    sample_indices,
)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _tokenizer(path, video: bool = True):
    """The word tokenizer of test_onevision's ov_model, with <video> at VIDEO_TOKEN."""
    from fastllava.evaluation.tokenizer import build_word_tokenizer

    words = WORDS + [f"w{i}" for i in range(VOCAB - 5 - len(WORDS))]
    d = json.loads(build_word_tokenizer(words, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).to_str())
    if video:
        vocab = d["model"]["vocab"]
        taken = next(w for w, i in vocab.items() if i == VIDEO_TOKEN)
        del vocab[taken]
        vocab["<video>"] = VIDEO_TOKEN
        d["added_tokens"].append({"id": VIDEO_TOKEN, "content": "<video>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(d))


@pytest.fixture(scope="module")
def ov_video(tmp_path_factory):
    hf = tiny_onevision(seed=7)
    path = save_checkpoint(hf, tmp_path_factory.mktemp("ov-video"))
    _tokenizer(path)
    _hf_processor().save_pretrained(path)
    return hf, fastllava.load(path, device="cpu")


def _clip(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [np.stack([x / w * 200 + 5 * t, y / h * 180, (x + y) / (w + h) * 255 - 3 * t], -1)
           + rng.normal(0, 20, (h, w, 3)) for t in range(frames)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def _reference_frames(video: np.ndarray, num_frames: int, size: int) -> torch.Tensor:
    """LlavaOnevisionVideoProcessor's documented steps in numpy: uniform sampling, resize to size x
    size (bicubic), rescale by 1/255, normalize with the mean and std."""
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    idx = default_sample_indices_fn(VideoMetadata(total_num_frames=len(video)), num_frames=num_frames)
    out = []
    for i in idx:
        arr = np.asarray(Image.fromarray(video[i]).resize((size, size), Image.BICUBIC)).astype(np.float64) / 255
        out.append(((arr.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _hf_tokens(hf, inputs, n: int) -> list[list[int]]:
    with torch.no_grad():
        ref = hf.generate(**{k: v for k, v in inputs.items() if v is not None}, max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return ref[:, inputs["input_ids"].shape[1]:].tolist()


def _same_tokens(results, ref, eos):
    for r, row in zip(results, ref):
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert r.token_ids == row[:cut]


def test_sampling_and_preprocessing_follow_transformers(ov_video):
    _, ours = ov_video
    assert sample_indices(10, 4) == [0, 2, 5, 7] and sample_indices(3, 8) == [0, 1, 2]
    video = _clip(10, 40, 56, 0)
    clips = ours.video_processor([video, list(video), [Image.fromarray(f) for f in video]], 4)
    expected = _reference_frames(video, 4, 32)
    for c in clips:
        assert c.shape == (4, 3, 32, 32)
        assert (c - expected).abs().max().item() <= 1e-5
    assert ours.video_processor.num_frames == 8  # no video_preprocessor_config.json: 8


def test_generate_with_videos_matches_transformers(ov_video):
    """A batch of a video prompt, an image + video prompt and an image prompt: the same greedy
    tokens as transformers' generate on the same inputs."""
    hf, ours = ov_video
    videos = [_clip(10, 40, 56, 1), _clip(6, 50, 30, 2), None]
    images = [None, _photo(40, 200, 3), _photo(90, 60, 4)]
    prompts = ["describe it .", "what is in the picture ?", "what is it ?"]
    out = ours.generate(images=images, prompts=prompts, videos=videos, num_frames=4, max_new_tokens=10)
    inputs = ours.inputs(images, prompts, videos, num_frames=4)
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, 32, 32)
    cfg = ours.config
    assert [r.stats["video_tokens"] for r in out] == [cfg.video_tokens(4)] * 2 + [0]
    assert [r.stats["image_tokens"] for r in out] == [0, cfg.image_tokens(40, 200), cfg.image_tokens(90, 60)]
    _same_tokens(out, _hf_tokens(hf, inputs, 10), cfg.text.eos_token_id)
    with torch.no_grad():  # the greedy tokens of a tiny random model repeat: compare the logits too
        ref = hf(**{k: v for k, v in inputs.items() if v is not None}).logits
    real = inputs["attention_mask"].bool()
    assert (ours.logits(**inputs)[real] - ref[real]).abs().max().item() <= 1e-4
    ids = ours.generate_ids(**inputs, max_new_tokens=10)
    assert [r.token_ids for r in out] == [row[:len(r.token_ids)] for r, row in zip(out, ids.tolist())]
    stream = ours.stream(video=videos[0], prompt=prompts[0], num_frames=4, max_new_tokens=10)
    assert "".join(stream) == out[0].text and stream.result.token_ids == out[0].token_ids


def test_videos_of_different_frame_counts_and_default_frames(ov_video):
    """A video shorter than num_frames keeps all its frames; videos of different frame counts in
    one batch give a list of pixel_values_videos, each matching transformers on its own."""
    hf, ours = ov_video
    videos, prompts = [_clip(3, 32, 32, 5), _clip(12, 32, 48, 6)], ["describe it .", "what is it ?"]
    inputs = ours.inputs([None, None], prompts, videos)
    assert [v.shape[0] for v in inputs["pixel_values_videos"]] == [3, 8]
    out = ours.generate(prompts=prompts, videos=videos, max_new_tokens=6)
    for i in range(2):
        one = ours.inputs([None], [prompts[i]], [videos[i]])
        _same_tokens([out[i]], _hf_tokens(hf, one, 6), ours.config.text.eos_token_id)


def test_static_decode_matches_eager_with_a_video(ov_video):
    _, eager = ov_video
    static = fastllava.load(eager.path, device="cpu", decode="static")
    kwargs = dict(images=[_photo(40, 60, 0), None], prompts=["describe it .", "what is it ?"],
                  videos=[_clip(5, 32, 32, 1), _clip(9, 40, 40, 2)], num_frames=4, max_new_tokens=6)
    assert [r.token_ids for r in static.generate(**kwargs)] == [r.token_ids for r in eager.generate(**kwargs)]


def test_refusals(ov_video, tmp_path):
    _, ours = ov_video
    video = _clip(4, 32, 32, 7)
    cases = [
        (dict(prompts=["a", "b"], videos=[video]), "1 videos for 2 prompts"),
        (dict(prompts=["a"], videos=[video], num_frames=1000), "num_frames"),
        (dict(prompts=["a"], videos=[video], num_frames=0), "num_frames"),
        (dict(prompts=["a"], videos=[np.zeros((2, 1, 200, 3), np.uint8)]), "differ at most"),
        (dict(prompts=["a"], videos=[np.zeros((0, 32, 32, 3), np.uint8)]), "no frames"),
        (dict(prompts=["a"], videos=[np.zeros((32, 32, 3), np.uint8)]), "frames, height, width"),
        (dict(prompts=["a"], videos=[video], reduce=f"random:keep={ours.config.frame_tokens + 1}"),
         "more than the .* of an image or video frame"),
        (dict(prompts=["<video> a"]), "video"),
        (dict(prompts=["a"], videos=[str(tmp_path / "missing")]), "does not exist"),
    ]
    for kwargs, message in cases:
        with pytest.raises(fastllava.UserError, match=message) as e:
            ours.generate(max_new_tokens=2, **kwargs)
        assert "\n" not in str(e.value)
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)  # not a video: one line, with PyAV or without
    with pytest.raises(fastllava.UserError, match=_corrupt_video_message()) as e:
        load_video(tmp_path / "clip.mp4", 4)
    assert "\n" not in str(e.value)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _corrupt_video_message() -> str:
    """What a garbage video file gives: a decoding error with PyAV, else the extra to install."""
    return "cannot be decoded" if _has_pyav() else r"fastllava\[video\]"


def test_video_files_without_pyav_name_the_extra(tmp_path, monkeypatch):
    """Without PyAV (its import made to fail), a video file, encoded bytes and `run --video` name
    the extra in one line."""
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    for call in (lambda: load_video(tmp_path / "clip.mp4", 4), lambda: load_video_bytes(b"\0" * 16, 4),
                 lambda: check_video_path(tmp_path / "clip.mp4")):
        with pytest.raises(fastllava.UserError, match=r"pip install 'fastllava\[video\]'") as e:
            call()
        assert "\n" not in str(e.value)


def test_corrupt_and_oversized_video_bytes(tmp_path):
    """Encoded video bytes (what the server reads): a corrupt or truncated file and an empty one
    are one-line UserErrors; the frame, pixel and duration limits are VideoTooLarge; a good file
    gives the frames PyAV decodes, sampled as a list of frames would be."""
    from test_next_video import _write_mp4

    if not _has_pyav():  # then every call names the extra (the test above checks how)
        with pytest.raises(fastllava.UserError, match=r"fastllava\[video\]"):
            load_video_bytes(b"\0" * 16, 4)
        return
    import av

    _write_mp4(tmp_path / "clip.mp4", _clip(11, 40, 56, 9))
    data = (tmp_path / "clip.mp4").read_bytes()
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    frames = load_video_bytes(data, 4)
    assert [np.asarray(f).tolist() for f in frames] == [decoded[i].tolist() for i in sample_indices(11, 4)]
    assert len(load_video_bytes(data, 4, max_frames=11)) == 4
    for kwargs, message in ((dict(max_frames=10), "over the limit of 10"), (dict(max_pixels=40 * 56 - 1), "pixels"),
                            (dict(max_seconds=0.5), "lasts")):
        with pytest.raises(VideoTooLarge, match=message) as e:
            load_video_bytes(data, 4, **kwargs)
        assert "\n" not in str(e.value)
    gif = io.BytesIO()  # an animated GIF: one of the containers a video may come in
    images = [Image.fromarray(f) for f in _clip(5, 32, 40, 3)]
    images[0].save(gif, "GIF", save_all=True, append_images=images[1:], duration=100)
    assert [f.size for f in load_video_bytes(gif.getvalue(), 3)] == [(40, 32)] * 3
    # FFmpeg's concat lists and playlists name other files: never opened (VIDEO_DEMUXERS), from bytes or a file
    playlist = "ffconcat version 1.0\nfile clip.mp4\n"
    (tmp_path / "list.mp4").write_text(playlist)
    with pytest.raises(fastllava.UserError, match="cannot be decoded"):
        load_video(tmp_path / "list.mp4", 4)
    for bad, message in ((b"", "empty"), (b"\0" * 64, "cannot be decoded"), (data[:len(data) // 3], "decoded|frames"),
                         (b"GIF89a" + bytes(200), "cannot be decoded|frames"),
                         (png_bytes(_photo(32, 32, 0)), "cannot be decoded"),  # an image is not a video
                         (playlist.encode(), "cannot be decoded")):  # a playlist never opens the files it names
        with pytest.raises(fastllava.UserError, match=message) as e:
            load_video_bytes(bad, 4)
        assert "\n" not in str(e.value) and not isinstance(e.value, VideoTooLarge)


def test_onevision_processor_config_errors_are_one_line(tmp_path):
    from fastllava.images import OnevisionProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": [32, 32]}))
    with pytest.raises(fastllava.UserError, match="not a valid image processor config") as e:
        OnevisionProcessor.from_dir(tmp_path, [(32, 32)], 32)
    assert "\n" not in str(e.value) and "preprocessor_config.json" in str(e.value)


def test_checkpoint_without_video_support(tmp_path):
    path = save_checkpoint(tiny_llava(), tmp_path / "llava")
    _tokenizer(path, video=False)
    model = fastllava.load(path, device="cpu")
    with pytest.raises(fastllava.UserError, match="takes no videos"):
        model.generate(prompts=["describe it ."], videos=[_clip(2, 32, 32, 0)], max_new_tokens=2)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(fastllava.UserError, match="takes no videos"):
        model.logits(ids, None, pixel_values_videos=torch.zeros(1, 2, 3, 32, 32))


def test_cli_run_with_a_folder_of_frames(ov_video, tmp_path, capsys):
    _, ours = ov_video
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
        assert out["stats"]["video_tokens"] == ours.config.video_tokens(3)
    assert main(["run", "--model", str(ours.path), "--video", str(tmp_path / "clip.webm"), "--prompt", "a"]) == 2
    (tmp_path / "clip.webm").write_bytes(b"\0")  # not a video
    assert main(["run", "--model", str(ours.path), "--device", "cpu", "--video", str(tmp_path / "clip.webm"),
                 "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0]
    assert re.search(_corrupt_video_message(), err[1])


def test_bench_times_a_video_input(tmp_path, capsys):
    """`bench --frames N` on a video preset: a prompt of text and one video of N random frames, its
    first greedy token that of the model's own logits on the same inputs; one-line refusals."""
    from fastllava.bench.measure import Case, bench_video_inputs, time_ours
    from fastllava.bench.presets import preset_config, random_model
    from fastllava.generation import Runner
    from fastllava.ops import positions_from_mask

    out = tmp_path / "b"
    assert main(["bench", "--preset", "tiny-next-video", "--device", "cpu", "--frames", "3", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "3", "--text-tokens", "8", "--batch-size", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    case = report["cases"][0]
    assert report["settings"]["frames"] == 3 and case["visual_tokens"] == 3 * 12 * 12 and case["ours"]["ttft_s"] > 0
    model = random_model(preset_config("tiny-next-video"), torch.device("cpu"), torch.float32)
    runner = Runner(model, "eager")
    timed = time_ours(runner, Case(2, None, 8, 3, frames=4), None, 1, 0)
    ids, mask, videos = bench_video_inputs(model, Case(2, None, 8, 3, frames=4))
    assert videos.shape == (2, 4, 3, 96, 96) and ((ids == model.cfg.video_token_index).sum(1) == 4 * 144).all()
    assert not (ids == model.cfg.image_token_index).any()
    valid = mask.bool()
    with torch.inference_mode():
        logits = runner.logits(ids, None, valid, positions_from_mask(valid), pixel_values_videos=videos)
    assert torch.equal(timed["tokens"][:, 0], logits[:, -1].argmax(-1))
    capsys.readouterr()
    out = tmp_path / "k"  # per-frame budgets (divprune by default: frames have no class-token attention), ngram
    assert main(["bench", "--preset", "tiny-next-video", "--device", "cpu", "--frames", "3", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "3", "--text-tokens", "8", "--keep", "144,16",
                 "--speculate", "ngram", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["reduce"] == "divprune"
    rows = {(c["visual_tokens"], c["decode"]): c for c in report["cases"]}
    ngram = "eager ngram:n=3,k=4"
    assert set(rows) == {(432, "eager"), (48, "eager"), (432, ngram), (48, ngram)}
    assert rows[(48, "eager")]["reduce"].startswith("divprune:keep=16,") and rows[(432, "eager")]["reduce"] is None
    assert rows[(48, ngram)]["same_tokens_as_first_decode"] and rows[(432, ngram)]["same_tokens_as_first_decode"]
    capsys.readouterr()
    for args, message in ((["--preset", "tiny", "--frames", "2"], "takes videos"),
                          (["--preset", "tiny-next-video", "--frames", "2", "--keep", "200"], "of a video frame"),
                          (["--preset", "tiny-next-video", "--frames", "2", "--keep", "8", "--reduce", "fastervlm"],
                           "class-token"),
                          (["--preset", "tiny-next-video", "--frames", "2", "--compare", "hf"], "--compare"),
                          (["--preset", "tiny-next-video", "--frames", "300"], "num_frames")):
        assert main(["bench", *args, "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
