"""Videos through the server, on tiny random LLaVA-NeXT-Video and LLaVA-OneVision checkpoints:
an encoded video (mp4 as a data: URL, or a file:// URL the operator allowed) or a list of frame
images answers as `Llava.generate(videos=...)` does; an image and a video in one prompt; a video
in the first turn of a chat; one prefill mixing video, image and text jobs (videos of different
frame counts); a per-request reduction with a video; and the refusals (a corrupt video, too many
frames, a checkpoint without videos, a reduction that cannot take a video), each one line, the
server answering afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hf_reference import save_checkpoint, tiny_next_video, tiny_onevision
from openai import OpenAI
from PIL import Image
from serve_helpers import data_url, png_bytes, raw_request, running_server, tiny_checkpoint
from test_next_video import TOWER, _checkpoint, _write_mp4
from test_onevision import _hf_processor, _photo
from test_video import _clip, _tokenizer

import fastllava
from fastllava.generation import SamplingParams
from fastllava.prompts import Turn
from fastllava.serve.scheduler import Job, Scheduler
from fastllava.serve.settings import Limits, Settings

FRAMES = 4  # the server's --num-frames in these tests
LIMITS = Limits(max_video_frames=40, max_videos=2, max_video_bytes=400_000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An 11-frame mp4, a 6-frame one, a 41-frame one, in a folder the server may read file:// URLs from."""
    root = tmp_path_factory.mktemp("videos")
    _write_mp4(root / "clip.mp4", _clip(11, 40, 56, 9))
    _write_mp4(root / "other.mp4", 255 - _clip(6, 48, 48, 3))  # colours inverted: another greedy answer
    _write_mp4(root / "long.mp4", _clip(41, 32, 32, 4))  # over LIMITS.max_video_frames
    return root


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = _checkpoint(tiny_next_video(seed=9, image_size=TOWER), tmp_path_factory.mktemp("next-video"))
    return fastllava.load(path, device="cpu")


@pytest.fixture(scope="module")
def base(llava, files):
    settings = Settings(model_id="tiny", max_batch_size=4, max_len=1024, num_frames=FRAMES, limits=LIMITS,
                        file_image_dir=files)
    with running_server(llava, settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _video_part(path) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path.read_bytes(), "video/mp4")}}


def _frames_part(video: np.ndarray) -> dict:
    return {"type": "video", "video": [data_url(png_bytes(Image.fromarray(f))) for f in video]}


def _image_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(img))}}


def _ask(client, parts: list[dict], text: str, n: int = 8, **kwargs):
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0, **kwargs)


def test_a_video_answers_as_generate(client, llava, files):
    """An mp4 as a data: URL, the same file as a file:// URL, and the clip's frames as PNG data:
    URLs (sampled as generate samples a list): generate's greedy text and token counts."""
    expected = llava.generate(prompts=["describe it ."], videos=[files / "clip.mp4"], num_frames=FRAMES,
                              max_new_tokens=8)[0]
    cached = []
    for part in (_video_part(files / "clip.mp4"),
                 {"type": "video_url", "video_url": {"url": (files / "clip.mp4").as_uri()}}):
        r = _ask(client, [part], "describe it .")
        assert r.choices[0].message.content == expected.text
        details = r.usage.prompt_tokens_details.model_extra
        assert details["video_tokens"] == expected.stats["video_tokens"] == llava.config.video_tokens(FRAMES)
        assert r.usage.prompt_tokens == expected.stats["prompt_tokens"] + expected.stats["video_tokens"]
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    # the same frames the second time (another URL): all but the last prompt token from the prefix cache
    assert cached == [0, r.usage.prompt_tokens - 1]
    video = _clip(11, 40, 56, 9)
    expected = llava.generate(prompts=["what is in the picture ?"], videos=[video], num_frames=FRAMES,
                              max_new_tokens=8)[0]
    chunks = list(_ask(client, [_frames_part(video)], "what is in the picture ?", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text


def test_two_videos_behind_the_same_text_do_not_share_tokens(client, llava, files):
    """The prefix cache never gives one video's tokens to another: each answer is its own video's,
    asked twice in turn."""
    answers = {}
    for name in ("clip.mp4", "other.mp4"):
        answers[name] = llava.generate(prompts=["describe it ."], videos=[files / name], num_frames=FRAMES,
                                       max_new_tokens=8)[0].text
    assert answers["clip.mp4"] != answers["other.mp4"]
    ids = llava.prompts.prompt_ids("describe it .", 0, [], [llava.config.video_tokens(FRAMES)])
    before_video = ids.index(llava.config.video_token_index)  # prompt tokens before the video's
    cached = []
    for name in ("clip.mp4", "other.mp4", "clip.mp4", "other.mp4"):
        r = _ask(client, [_video_part(files / name)], "describe it .")
        assert r.choices[0].message.content == answers[name]
        cached.append((r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens))
    assert cached[1][0] <= before_video  # other.mp4, first asked after clip.mp4: none of clip's tokens
    assert [c for c, _ in cached[2:]] == [n - 1 for _, n in cached[2:]]  # each asked again: all but the last


def test_an_image_and_a_video_in_one_prompt(client, llava, files):
    img = _photo(40, 200, 7)
    expected = llava.generate(images=[img], prompts=["is the photo in the clip ?"], videos=[files / "clip.mp4"],
                              num_frames=FRAMES, max_new_tokens=8)[0]
    r = _ask(client, [_video_part(files / "clip.mp4"), _image_part(img)], "is the photo in the clip ?")
    assert r.choices[0].message.content == expected.text
    details = r.usage.prompt_tokens_details
    assert details.image_tokens == expected.stats["image_tokens"] == llava.config.image_tokens(40, 200)
    assert details.model_extra["video_tokens"] == expected.stats["video_tokens"]


def test_a_video_in_the_first_turn_of_a_chat(client, llava, files):
    """A video in the first user turn, an answer, then a question: generate_ids on the turns' ids."""
    first = [_video_part(files / "clip.mp4"), {"type": "text", "text": "describe it ."}]
    messages = [{"role": "user", "content": first},
                {"role": "assistant", "content": "it is ."},
                {"role": "user", "content": "what is in the picture ?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    tokens = llava.config.video_tokens(FRAMES)
    ids = llava.prompts.chat_ids([Turn("user", "describe it .", 0, 1), Turn("assistant", "it is ."),
                                  Turn("user", "what is in the picture ?")], None, [tokens])
    frames = llava.video_processor([files / "clip.mp4"], FRAMES)[0]  # [T, 3, H, W]
    out = llava.generate_ids(torch.tensor([ids]), None, pixel_values_videos=frames[None], max_new_tokens=8)[0]
    eos = llava.config.text.eos_token_id
    assert r.choices[0].message.content == llava.prompts.decode([t for t in out.tolist() if t not in eos])
    assert r.usage.prompt_tokens == len(ids)


def test_videos_in_two_turns(client, llava, files):
    """A video in each of two user turns (--max-videos 2): each video's tokens in its turn, the
    features in order; generate_ids on the turns' ids with both videos (different frame counts)."""
    first = [_video_part(files / "clip.mp4"), {"type": "text", "text": "describe it ."}]
    messages = [{"role": "user", "content": first},
                {"role": "assistant", "content": "it is ."},
                {"role": "user", "content": [{"type": "text", "text": "and this ?"}, _video_part(files / "other.mp4")]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    clips = llava.video_processor([files / "clip.mp4", files / "other.mp4"], FRAMES)  # [4, 3, H, W], [4, 3, H, W]
    tokens = [llava.config.video_tokens(c.shape[0]) for c in clips]
    ids = llava.prompts.chat_ids([Turn("user", "describe it .", 0, 1), Turn("assistant", "it is ."),
                                  Turn("user", "and this ?", 0, 1)], None, tokens)
    out = llava.generate_ids(torch.tensor([ids]), None, pixel_values_videos=torch.stack(clips), max_new_tokens=8)[0]
    eos = llava.config.text.eos_token_id
    assert r.choices[0].message.content == llava.prompts.decode([t for t in out.tolist() if t not in eos])
    assert r.usage.prompt_tokens_details.model_extra["video_tokens"] == sum(tokens)
    swapped = [messages[0], messages[1], {**messages[2], "content": [messages[2]["content"][0],
                                                                     _video_part(files / "clip.mp4")]}]
    other = client.chat.completions.create(model="tiny", messages=swapped, max_tokens=8, temperature=0)
    out = llava.generate_ids(torch.tensor([ids]), None, pixel_values_videos=torch.stack([clips[0], clips[0]]),
                             max_new_tokens=8)[0]
    assert other.choices[0].message.content == llava.prompts.decode([t for t in out.tolist() if t not in eos])


def test_one_prefill_mixes_videos_images_and_text(llava):
    """Jobs admitted together: two videos of different frame counts (a list of pixel_values_videos),
    an image and a text-only prompt prefilled as one batch; each answers as its own generate."""
    model = fastllava.load(llava.path, device="cpu")  # its own runner: the server's is not shared
    cases = [(None, _clip(11, 40, 56, 1), "describe it ."), (_photo(40, 200, 2), None, "what is it ?"),
             (None, _clip(3, 50, 30, 2), "what is in the picture ?"), (None, None, "describe it .")]
    scheduler = Scheduler(model, max_batch_size=4, max_queue=8, max_len=512)
    results, done = {}, threading.Event()

    def emit_for(i):
        def emit(event):
            if event[0] in ("done", "error"):
                results[i] = event
                if len(results) == len(cases):
                    done.set()
        return emit

    for i, (image, video, prompt) in enumerate(cases):
        inputs = model.inputs([image], [prompt], [video], num_frames=FRAMES)
        pixels = inputs["pixel_values"]  # [1, P, 3, H, W]: one image, no padding tiles
        videos = inputs.get("pixel_values_videos")  # [1, T, 3, H, W]
        scheduler.submit(Job(inputs["input_ids"][0].tolist(), None if pixels is None else pixels[0],
                             inputs["image_sizes"], SamplingParams(8, 0.0), False, emit_for(i),
                             videos=None if videos is None else list(videos)))
    scheduler.start()
    try:
        assert done.wait(300)
    finally:
        scheduler.stop()
    assert model.runner.calls["eager_prefill"] == 1  # the four jobs in one prefill
    for i, (image, video, prompt) in enumerate(cases):
        kind, finish = results[i]
        assert kind == "done", finish
        expected = model.generate(images=[image], prompts=[prompt], videos=[video], num_frames=FRAMES,
                                  max_new_tokens=8)[0]
        assert finish.text == expected.text, i


def test_concurrent_video_and_image_requests(client, llava, files):
    """Video, image and image + video requests sent at once: each answers as its generate."""
    img = _photo(90, 60, 4)
    asks = [([_video_part(files / "clip.mp4")], "describe it .", dict(videos=[files / "clip.mp4"])),
            ([_image_part(img)], "what is it ?", dict(images=[img])),
            ([_video_part(files / "other.mp4"), _image_part(img)], "is the photo in the clip ?",
             dict(images=[img], videos=[files / "other.mp4"]))]
    got = [None] * len(asks)

    def run(i):
        parts, text, _ = asks[i]
        got[i] = _ask(client, parts, text).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, text, kwargs), answer in zip(asks, got):
        assert answer == llava.generate(prompts=[text], num_frames=FRAMES, max_new_tokens=8, **kwargs)[0].text


def _post(base, parts, **extra):
    return raw_request(base, "POST", "/v1/chat/completions",
                       {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": parts + [
                           {"type": "text", "text": "describe it ."}]}], **extra})


def test_bad_videos_are_one_line_errors(base, client, files):
    mp4 = (files / "clip.mp4").read_bytes()
    frames = _clip(41, 32, 32, 5)
    bad = [
        ("not a video", [{"type": "video_url", "video_url": {"url": data_url(b"\0" * 64, "video/mp4")}}], {},
         422, "invalid_video"),
        ("a truncated mp4", [{"type": "video_url", "video_url": {"url": data_url(mp4[:200], "video/mp4")}}], {},
         422, "invalid_video"),
        ("an image as a video", [{"type": "video_url", "video_url": {"url": data_url(png_bytes(_photo(32, 32, 0)),
                                                                                    "video/mp4")}}], {},
         422, "invalid_video"),
        ("more frames than allowed (file)", [_video_part(files / "long.mp4")], {}, 413, "video_too_large"),
        ("more frames than allowed (list)", [_frames_part(frames)], {}, 413, "video_too_large"),
        ("over the byte limit", [{"type": "video_url", "video_url": {"url": data_url(b"\0" * 500_000, "video/mp4")}}],
         {}, 413, "video_too_large"),
        ("a frame that is not an image", [{"type": "video", "video": [data_url(b"nope")]}], {}, 422, "invalid_image"),
        ("an image data: URL as a video", [{"type": "video_url", "video_url": {"url": data_url(mp4, "image/png")}}],
         {}, 400, "invalid_video_url"),
        ("bad base64", [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}}], {}, 400,
         "invalid_base64"),
        ("http without --allow-http-images", [{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}}],
         {}, 400, "url_not_allowed"),
        ("file:// outside the folder", [{"type": "video_url", "video_url": {"url": "file:///etc/hostname"}}], {},
         400, "url_not_allowed"),
        ("an empty frame list", [{"type": "video", "video": []}], {}, 400, "invalid_type"),
        ("three videos", [_video_part(files / "clip.mp4")] * 3, {}, 400, "too_many_videos"),
        ("a class-token reduction with a video", [_video_part(files / "clip.mp4")], {"reduce": "fastervlm:keep=8"},
         400, "invalid_reduction"),
        ("a budget over a frame's tokens", [_video_part(files / "clip.mp4")], {"reduce": "fastv:keep=20,layer=1"},
         400, "invalid_reduction"),
        ("a video in the text", [], {"messages": [{"role": "user", "content": "<video> describe it ."}]}, 400,
         "invalid_prompt"),
    ]
    for name, parts, extra, status, code in bad:
        got, body = _post(base, parts, **extra)
        assert (got, body["error"]["code"]) == (status, code), (name, body)
        assert "\n" not in body["error"]["message"] and body["error"]["message"], name
    got, body = raw_request(base, "POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": "describe it ."},
        {"role": "assistant", "content": [_video_part(files / "clip.mp4")]},
        {"role": "user", "content": "what is it ?"}]})
    assert got == 400 and body["error"]["code"] == "unsupported_value"
    assert _ask(client, [_video_part(files / "clip.mp4")], "describe it .", n=2).choices[0].message.content is not None
    assert raw_request(base, "GET", "/health")[1]["status"] == "ok"


def test_a_checkpoint_without_videos_refuses_them(tmp_path, files):
    llava = fastllava.load(tiny_checkpoint(tmp_path / "llava"), device="cpu")
    with running_server(llava, Settings(model_id="tiny", max_len=256)) as url:
        for parts in ([_video_part(files / "clip.mp4")], [_frames_part(_clip(3, 32, 32, 0))]):
            status, body = _post(url, parts)
            assert status == 400 and body["error"]["code"] == "unsupported_value", body
            assert "takes no videos" in body["error"]["message"] and "\n" not in body["error"]["message"]
        status, body = _post(url, [])
        assert status == 200 and body["choices"][0]["message"]["content"] is not None


def test_onevision_video_answers_as_generate(tmp_path, files):
    """LLaVA-OneVision (SigLIP, Qwen2, a newline after the video): an mp4 and an image + video."""
    path = save_checkpoint(tiny_onevision(seed=7), tmp_path / "ov")
    _tokenizer(path)
    _hf_processor().save_pretrained(path)
    llava = fastllava.load(path, device="cpu")
    img = _photo(50, 50, 1)
    with running_server(llava, Settings(model_id="tiny", max_len=1024, num_frames=3)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for image in (None, img):
            expected = llava.generate(images=[image], prompts=["describe it ."], videos=[files / "clip.mp4"],
                                      num_frames=3, max_new_tokens=8)[0]
            parts = [_video_part(files / "clip.mp4")] + ([_image_part(img)] if image is not None else [])
            r = _ask(client, parts, "describe it .")
            assert r.choices[0].message.content == expected.text
            assert r.usage.prompt_tokens_details.model_extra["video_tokens"] == llava.config.video_tokens(3)


def test_serve_video_options(tmp_path):
    from fastllava.cli import build_parser
    from fastllava.serve.command import settings_from_args

    args = build_parser().parse_args(["serve", "--num-frames", "16", "--max-videos", "3", "--max-video-frames", "100",
                                      "--max-video-bytes", "1000", "--max-video-pixels", "4096",
                                      "--max-video-seconds", "2.5"])
    s = settings_from_args(args, tmp_path)
    assert s.num_frames == 16 and (s.limits.max_videos, s.limits.max_video_frames) == (3, 100)
    assert (s.limits.max_video_bytes, s.limits.max_video_pixels, s.limits.max_video_seconds) == (1000, 4096, 2.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-video-seconds", "nan"])
    args = build_parser().parse_args(["serve", "--num-frames", "1000"])
    with pytest.raises(fastllava.UserError, match="num_frames"):
        args.func(args)


def test_server_wide_reduce_and_speculate_take_videos(llava, files):
    """A server started with --reduce reduces a video request's frames as generate does (and one
    whose method cannot take videos answers them with one 400 line naming its own setting, and
    keeps answering image requests); one started with --speculate answers a video request as
    generate does."""
    spec = "fastv:keep=4,layer=1"
    expected = llava.generate(prompts=["describe it ."], videos=[files / "clip.mp4"], num_frames=FRAMES,
                              max_new_tokens=8, reduce=spec)[0]
    assert expected.stats["visual_tokens"] == [llava.config.video_tokens(FRAMES), 4 * FRAMES]
    settings = Settings(model_id="tiny", max_len=1024, reduce=spec, num_frames=FRAMES, limits=LIMITS)
    with running_server(llava, settings) as url:
        status, body = _post(url, [_video_part(files / "clip.mp4")], max_tokens=8, temperature=0)
        assert status == 200 and body["choices"][0]["message"]["content"] == expected.text, body
    with running_server(llava, Settings(model_id="tiny", max_len=1024, reduce="fastervlm:keep=8")) as url:
        status, body = _post(url, [_video_part(files / "clip.mp4")])
        assert (status, body["error"]["code"]) == (400, "invalid_reduction"), body
        assert "--reduce" in body["error"]["message"] and "\n" not in body["error"]["message"]
        status, body = _post(url, [_image_part(_photo(40, 60, 1))])
        assert status == 200, body
    expected = llava.generate(prompts=["describe it ."], videos=[files / "clip.mp4"], num_frames=FRAMES,
                              max_new_tokens=8)[0].text
    settings = Settings(model_id="tiny", max_len=1024, speculate="ngram:k=3", num_frames=FRAMES, limits=LIMITS)
    with running_server(llava, settings) as url:
        status, body = _post(url, [_video_part(files / "clip.mp4")], max_tokens=8, temperature=0)
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, body
