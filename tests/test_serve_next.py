"""The OpenAI-compatible server on a tiny random LLaVA-NeXT checkpoint: concurrent requests with
images of different aspect ratios (so different tile counts and visual tokens), and one prefill
of such images, answer as model.generate alone; so does per-request reduction (per tile before
the LLM, tile-aware, inside it) as model.generate(reduce=...), and two images in one request;
reductions NeXT cannot take are 400s."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import BadRequestError, OpenAI

import fastllava
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation import SamplingParams
from fastllava.serve.app import _pixels
from fastllava.serve.scheduler import Job, Scheduler
from fastllava.serve.settings import Settings
from hf_reference import IMAGE_TOKEN, PINPOINTS, VOCAB, save_checkpoint, tiny_llava
from serve_helpers import data_url, png_bytes, running_server, user_message
from test_llava_next import PROCESSOR, WORDS, _photo

SIZES = [(40, 160), (160, 40), (50, 50), (300, 20)]  # 1:4, 4:1, square, 15:1 -> 68, 76, 88, 28 visual tokens
PROMPTS = ["describe it .", "what is in the picture ?", "what is it ?", "describe the picture ."]
REDUCE_SPECS = [None, "fastervlm:keep=20", "visionzip:keep=20,contextual=3", "hired:keep=20", "globalcom2:keep=20",
                "fastv:keep=20,layer=1", "pdrop:keep=20,ratio=1", "dart:keep=20,layer=1,pivots=3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_checkpoint(tiny_llava(pinpoints=PINPOINTS, seed=11, kv_heads=2), tmp_path_factory.mktemp("sn"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path


@pytest.fixture(scope="module")
def llava(ckpt):
    return fastllava.load(ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def client(llava):
    with running_server(llava, Settings(model_id="next", max_batch_size=4, max_queue=64)) as url:
        yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _image(i: int):
    h, w = SIZES[i % len(SIZES)]
    return _photo(h, w, 40 + i)


def _ask(client, images, prompt: str, **kw):
    urls = [data_url(png_bytes(im)) for im in images]
    return client.chat.completions.create(model="next", messages=user_message(prompt, *urls), temperature=0, **kw)


def test_concurrent_requests_of_different_aspect_ratios_equal_generate(client, llava):
    jobs = [(i, PROMPTS[i % 4], 6 + (i * 5) % 14) for i in range(12)]  # (image, prompt, max_tokens)
    refs = [llava.generate(images=[_image(i)], prompts=[p], max_new_tokens=n)[0] for i, p, n in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _ask(client, [_image(j[0])], j[1], max_tokens=j[2]), jobs))
    for (i, _, _), ref, r in zip(jobs, refs, results):
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), i
        u = r.usage
        assert u.completion_tokens == ref.stats["generated_tokens"]
        assert u.prompt_tokens_details.image_tokens == ref.stats["image_tokens"] == llava.config.image_tokens(
            *SIZES[i % 4])
        assert u.prompt_tokens == ref.stats["prompt_tokens"] + ref.stats["image_tokens"]
    stream = _ask(client, [_image(1)], PROMPTS[1], max_tokens=16, stream=True)
    ref = llava.generate(images=[_image(1)], prompts=[PROMPTS[1]], max_new_tokens=16)[0]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_per_request_reduction_equals_generate(client, llava):
    """Different reductions (per tile before the LLM, tile-aware, inside the LLM) decode together,
    each as model.generate(..., reduce=spec) alone, with the same visual token counts."""
    jobs = [(i, PROMPTS[i % 4], REDUCE_SPECS[i % len(REDUCE_SPECS)]) for i in range(16)]
    refs = [llava.generate(images=[_image(i)], prompts=[p], max_new_tokens=12, reduce=spec)[0] for i, p, spec in jobs]

    def ask(job):
        i, prompt, spec = job
        return _ask(client, [_image(i)], prompt, max_tokens=12, extra_body={"reduce": spec} if spec else None)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for (_, _, spec), ref, r in zip(jobs, refs, results):
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), spec
        kept = (r.usage.prompt_tokens_details.model_extra or {}).get("visual_tokens")
        assert kept == (ref.stats["visual_tokens"] if spec else None), spec


@pytest.mark.parametrize("spec", [None, "visionzip:keep=20,contextual=3", "globalcom2:keep=20",
                                  "fastv:keep=20,layer=1"])
def test_one_prefill_of_images_with_different_tile_counts(llava, spec):
    """Jobs queued before the scheduler starts are prefilled as one batch (tiles of 4 and 5
    pieces per image concatenated, image_sizes alongside); each answers as model.generate alone."""
    scheduler = Scheduler(llava, max_batch_size=4, max_queue=8, max_len=256)
    events = []
    for i in range(4):
        img, q = _image(i), queue.Queue()
        ids = llava.prompts.prompt_ids(PROMPTS[i], 1, [llava.config.image_tokens(img.height, img.width)])
        pixel_values, image_sizes, _ = _pixels(llava, [img])  # [P, 3, 32, 32], [1, 2]
        scheduler.submit(Job(ids, pixel_values, image_sizes, SamplingParams(12), False, q.put, spec))
        events.append(q)
    scheduler.start()
    try:
        finished = [q.get(timeout=120) for q in events]
    finally:
        scheduler.stop()
    for i, (kind, fin) in enumerate(finished):
        ref = llava.generate(images=[_image(i)], prompts=[PROMPTS[i]], max_new_tokens=12, reduce=spec)[0]
        assert kind == "done" and (fin.text, fin.finish_reason) == (ref.text, ref.finish_reason), (spec, i)
        assert fin.visual_tokens == (ref.stats["visual_tokens"] if spec else None)


def test_two_images_in_one_request(client, llava):
    images, prompt = [_image(0), _image(3)], "what is in the picture ?"
    counts = [llava.config.image_tokens(im.height, im.width) for im in images]
    ids = torch.tensor([llava.prompts.prompt_ids(prompt, 2, counts)])  # [1, T]
    pixel_values, image_sizes = llava.processor(images)  # [2, P, 3, 32, 32], [2, 2]
    for spec in (None, "visionzip:keep=20,contextual=3"):
        ref = llava.generate_ids(ids, pixel_values, max_new_tokens=10, image_sizes=image_sizes, reduce=spec)[0]
        eos = llava.config.text.eos_token_id
        answer = next((ref[:k] for k, t in enumerate(ref.tolist()) if t in eos), ref).tolist()
        r = _ask(client, images, prompt, max_tokens=10, extra_body={"reduce": spec} if spec else None)
        assert r.choices[0].message.content == llava.prompts.decode(answer)
        assert r.usage.prompt_tokens_details.image_tokens == sum(counts)


def test_reductions_next_cannot_take_are_400s(client, llava):
    for spec, says in (("pool:keep=4", "LLaVA-NeXT"), ("fastervlm:keep=40", "28 visual tokens of image 1")):
        with pytest.raises(BadRequestError) as e:  # image 3 is 300x20: 28 visual tokens
            _ask(client, [_image(3)], "what is it ?", max_tokens=4, extra_body={"reduce": spec})
        err = e.value.body
        assert e.value.status_code == 400 and err["code"] == "invalid_reduction" and says in err["message"], err
        assert "\n" not in err["message"]
    r = _ask(client, [_image(2)], "what is it ?", max_tokens=4, extra_body={"reduce": "fastervlm:keep=40"})
    assert r.choices[0].finish_reason in ("stop", "length")  # 88 tokens: the same budget fits


def test_cli_serve_refuses_pool_on_next(ckpt):
    r = subprocess.run([sys.executable, "-m", "fastllava.cli", "serve", "--model", str(ckpt), "--device", "cpu",
                        "--reduce", "pool:keep=4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--reduce" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
