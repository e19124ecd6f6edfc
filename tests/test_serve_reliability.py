"""The server under requests that used to hang it, take its neighbours down or block its event
loop: admission uses the validation's arithmetic, a failing request is answered alone, and the
health check answers while a huge request is being parsed."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastllava
from fastllava.generation import SamplingParams
from fastllava.serve.scheduler import Job, Scheduler
from fastllava.serve.settings import Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint, user_message


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("reliable") / "m")


def _body(image: int, text: str, **kw) -> dict:
    return {"model": "tiny", "messages": user_message(text, data_url(png_bytes(random_image(image)))), **kw}


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_a_request_that_fits_the_context_is_admitted_with_fixed_shapes(path, mode):
    """The prompt (~24 tokens) fits a 96-token context with max_tokens 70, but padded to the 64-token
    prefill bucket it would need 64 + 69 slots: it used to wait for ever, blocking the queue. Now
    it is answered, as eager generate answers it, and so is the request queued behind it."""
    eager = fastllava.load(path, device="cpu")
    fixed = fastllava.load(path, device="cpu", decode=mode)
    t = len(fixed.inputs([random_image(1)], ["describe it ."])["input_ids"][0])
    n = 96 - t
    assert t + n == 96 and 64 + n - 1 > 96
    with running_server(fixed, Settings(model_id="tiny", max_batch_size=2, max_len=96)) as base:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: raw_request(base, "POST", "/v1/chat/completions", b),
                                    [_body(1, "describe it .", max_tokens=n, temperature=0, ignore_eos=True),
                                     _body(2, "what color is the circle ?", max_tokens=8, temperature=0)]))
    ref = eager.generate_ids(*[eager.inputs([random_image(1)], ["describe it ."])[k]
                               for k in ("input_ids", "pixel_values", "attention_mask")],
                             max_new_tokens=n, eos_token_id=None)[0].tolist()
    (status1, body1), (status2, body2) = answers
    assert status1 == 200 and status2 == 200, (body1, body2)
    assert body1["usage"]["completion_tokens"] == n and body1["choices"][0]["finish_reason"] == "length"
    assert body1["choices"][0]["message"]["content"] == eager.prompts.decode(ref)


def test_a_request_over_the_context_is_clamped_at_once(path):
    """max_tokens past the context is cut to what fits (finish_reason "length"), at once; a prompt
    that does not fit itself is refused at once."""
    fixed = fastllava.load(path, device="cpu", decode="static")
    with running_server(fixed, Settings(model_id="tiny", max_batch_size=2, max_len=96)) as base:
        status, body = raw_request(base, "POST", "/v1/chat/completions",
                                   _body(1, "describe it .", max_tokens=90, ignore_eos=True))
        assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 96
        t0 = time.perf_counter()
        status, body = raw_request(base, "POST", "/v1/chat/completions", _body(1, "what " * 120))
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - t0 < 5


def _jobs(llava, specs: list[dict]) -> tuple[list[Job], list[threading.Event], list[list]]:
    """Jobs for the scheduler (one image each), with events set and answers collected as they finish."""
    jobs, done, got = [], [], []
    for i, spec in enumerate(specs):
        inputs = llava.inputs([random_image(40 + i)], ["describe it ."])
        ids = inputs["input_ids"][0].tolist()
        event, out = threading.Event(), []

        def emit(e, out=out, event=event):
            out.append(e)
            if e[0] != "delta":
                event.set()

        params = spec.pop("params")
        jobs.append(Job(ids, inputs["pixel_values"], None, params, False, emit, **spec))
        done.append(event)
        got.append(out)
    return jobs, done, got


def _run(llava, jobs, done, max_len=256):
    scheduler = Scheduler(llava, max_batch_size=4, max_queue=8, max_len=max_len)
    scheduler.waiting.extend(jobs)  # admitted together, in one prefill group
    scheduler.start()
    try:
        for event in done:
            assert event.wait(120), "a job was never answered"
    finally:
        scheduler.stop()
    return scheduler


def test_a_row_whose_sampling_fails_is_answered_alone(path):
    """A job whose sampling breaks (NaN temperature, as an unvalidated top_p that rounds to 0 used
    to) beside healthy ones: it gets a 500, they get their answers, equal to generate's."""
    llava = fastllava.load(path, device="cpu")
    good = SamplingParams(max_new_tokens=12)
    bad = SamplingParams(max_new_tokens=12, temperature=float("nan"))  # never validated: as a bug would let it
    jobs, done, got = _jobs(llava, [dict(params=good), dict(params=bad), dict(params=SamplingParams(12))])
    _run(llava, jobs, done)
    assert got[1][-1][0] == "error" and got[1][-1][1].status == 500
    for i in (0, 2):
        ref = llava.generate(images=[random_image(40 + i)], prompts=["describe it ."], max_new_tokens=12)[0]
        assert got[i][-1][0] == "done" and got[i][-1][1].text == ref.text


def test_a_prefill_group_with_one_bad_job_answers_the_others(path):
    """Jobs admitted together are prefilled as one batch; when that fails because of one job (here
    its pixel values hold two images for one image in the prompt), each is tried alone: only the
    job at fault gets the error."""
    llava = fastllava.load(path, device="cpu")
    jobs, done, got = _jobs(llava, [dict(params=SamplingParams(8)) for _ in range(3)])
    jobs[1].pixel_values = torch.cat([jobs[1].pixel_values] * 2)
    _run(llava, jobs, done)
    assert got[1][-1][0] == "error" and got[1][-1][1].status == 400
    for i in (0, 2):
        ref = llava.generate(images=[random_image(40 + i)], prompts=["describe it ."], max_new_tokens=8)[0]
        assert got[i][-1][0] == "done" and got[i][-1][1].text == ref.text


def test_a_client_callback_that_fails_takes_only_its_row(path):
    llava = fastllava.load(path, device="cpu")
    jobs, done, got = _jobs(llava, [dict(params=SamplingParams(10)) for _ in range(2)])
    calls = []

    def broken(event):  # a client whose connection handler raises on its answer
        calls.append(event)
        done[0].set()
        if event[0] == "done":
            raise ConnectionError("the client's handler failed")

    jobs[0].emit = broken
    _run(llava, jobs, done)
    ref = llava.generate(images=[random_image(41)], prompts=["describe it ."], max_new_tokens=10)[0]
    assert got[1][-1][0] == "done" and got[1][-1][1].text == ref.text
    assert [e[0] for e in calls] == ["done", "error"]  # its own failure reported to it, once


@pytest.mark.parametrize("body", [dict(temperature=1, top_p=1e-300), dict(temperature=0.7, top_p=0)])
def test_top_p_that_rounds_to_zero_keeps_the_most_likely_token(path, body):
    """top_p 1e-300 is 0 in float32: sampling keeps the most likely token (it dropped every token and
    sampled NaN, failing every request in flight); top_p 0 is greedy."""
    llava = fastllava.load(path, device="cpu")
    ref = llava.generate(images=[random_image(3)], prompts=["describe it ."], max_new_tokens=10)[0]
    with running_server(llava, Settings(model_id="tiny")) as base:
        status, out = raw_request(base, "POST", "/v1/chat/completions",
                                  _body(3, "describe it .", max_tokens=10, seed=5, **body))
    assert status == 200 and out["choices"][0]["message"]["content"] == ref.text


def test_health_answers_while_a_huge_prompt_is_refused(path):
    """A 20 MB one-word prompt (within the body limit) is parsed off the event loop and refused on
    its length before any tokenizing; /health answers within a second meanwhile."""
    llava = fastllava.load(path, device="cpu")
    huge = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "w" * (20 * 2**20)}]}).encode()
    with running_server(llava, Settings(model_id="tiny")) as base:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(raw_request, base, "POST", "/v1/chat/completions", huge)
            slowest, polls = 0.0, 0
            while not answer.done():
                t0 = time.perf_counter()
                status, health = raw_request(base, "GET", "/health")
                slowest, polls = max(slowest, time.perf_counter() - t0), polls + 1
                assert status == 200
            status, body = answer.result()
    assert polls >= 1
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "characters" in body["error"]["message"]
    assert slowest < 1.0


def test_images_over_the_context_are_refused_before_they_are_decoded(path):
    """Four images of 16 visual tokens each do not fit a 48-token context: the request is refused
    from the images' headers, before any is decoded (a corrupt body after a valid PNG header would
    otherwise answer 422 'not an image')."""
    llava = fastllava.load(path, device="cpu")
    good = png_bytes(random_image(7))
    broken = good[:60] + b"\0" * 200  # a valid header, then no image data
    body = {"model": "tiny", "max_tokens": 4,
            "messages": user_message("describe it .", *[data_url(broken)] * 4)}
    with running_server(llava, Settings(model_id="tiny", max_len=48)) as base:
        status, out = raw_request(base, "POST", "/v1/chat/completions", body)
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        status, out = raw_request(base, "POST", "/v1/chat/completions",
                                  {**body, "messages": user_message("describe it .", data_url(broken))})
        assert status == 422 and out["error"]["code"] == "invalid_image", out  # it fits: decoded, and refused
