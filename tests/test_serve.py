"""The OpenAI-compatible server, called with the official openai client: answers equal
model.generate, streaming, continuous batching of concurrent requests, disconnects, a full queue."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI, RateLimitError

import fastllava
from fastllava.serve.settings import Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint, user_message

KEY = "sk-test"
PROMPTS = ["what color is the circle ?", "describe it .", "how many red square are there ?", "what is it ?"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("serve")), device="cpu")


@pytest.fixture(scope="module")
def base(llava):
    with running_server(llava, Settings(model_id="tiny", api_key=KEY, max_batch_size=8, max_queue=64)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def _ask(client, image_seed: int, prompt: str, **kw):
    img = random_image(image_seed)
    return client.chat.completions.create(model="tiny", messages=user_message(prompt, data_url(png_bytes(img))), **kw)


def test_non_streaming_with_image_equals_generate(client, llava):
    for kw, gen in ((dict(temperature=0), dict()), (dict(temperature=0.9, top_p=0.9, seed=7),
                                                    dict(temperature=0.9, top_p=0.9, seed=7))):
        r = _ask(client, 1, "describe it .", max_tokens=24, **kw)
        ref = llava.generate(images=[random_image(1)], prompts=["describe it ."], max_new_tokens=24, **gen)[0]
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.object == "chat.completion" and r.model == "tiny" and r.choices[0].message.role == "assistant"
        u = r.usage
        assert u.completion_tokens == ref.stats["generated_tokens"]
        assert u.prompt_tokens == ref.stats["prompt_tokens"] + ref.stats["image_tokens"]
        assert u.prompt_tokens_details.image_tokens == 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_with_image_equals_generate(client, llava):
    stream = _ask(client, 2, "what is it ?", max_completion_tokens=30, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    ref = llava.generate(images=[random_image(2)], prompts=["what is it ?"], max_new_tokens=30)[0]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.stats["generated_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_and_text_only(client, llava):
    full = llava.generate(images=[random_image(3)], prompts=["describe it ."], max_new_tokens=20)[0]
    words = full.text.split()
    assert len(words) >= 3
    r = _ask(client, 3, "describe it .", max_tokens=20, temperature=0, stop=[words[2]])
    ref = llava.generate(images=[random_image(3)], prompts=["describe it ."], max_new_tokens=20, stop=[words[2]])[0]
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, "stop")
    tiny = _ask(client, 3, "describe it .", max_tokens=20, temperature=1e-300, seed=1)  # as greedy, not NaN
    assert tiny.choices[0].message.content == full.text
    r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=10,
                                       messages=[{"role": "system", "content": "red"},
                                                 {"role": "user", "content": "what is it ?"}])
    ref = llava.generate(images=[None], prompts=["red\nwhat is it ?"], max_new_tokens=10)[0]
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens_details.image_tokens == 0


def test_ignore_eos_runs_to_max_tokens(client, llava):
    img = random_image(4)
    r = _ask(client, 4, "describe it .", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    ids, mask, pixels = llava.encode([img], ["describe it ."])
    ref = llava.generate_ids(ids, pixels, mask, max_new_tokens=40, eos_token_id=None)[0].tolist()
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == llava.prompts.decode(ref)


def test_64_concurrent_requests_equal_one_at_a_time(client, llava, base):
    jobs = []  # (seed, prompt, kwargs): varied lengths, stops and sampling so rows come and go mid-decode
    for i in range(64):
        kw = dict(max_tokens=4 + (i * 7) % 40, temperature=0)
        if i % 5 == 0:
            kw.update(temperature=0.8, seed=i)
        jobs.append((100 + i, PROMPTS[i % 4], kw))
    refs = [llava.generate(images=[random_image(s)], prompts=[p], max_new_tokens=kw["max_tokens"],
                           temperature=kw["temperature"], seed=kw.get("seed"))[0] for s, p, kw in jobs]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda job: _ask(client, job[0], job[1], **job[2]), jobs))
    for ref, r in zip(refs, results):
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason)
        assert r.usage.completion_tokens == ref.stats["generated_tokens"]
    status, health = raw_request(base, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["active"] == 0 and health["waiting"] == 0


REDUCE_SPECS = [None, "visionzip:keep=8", "fastv:keep=6,layer=1", "pool:keep=4", "pdrop:keep=8", "dart:keep=8,layer=1",
                "fastervlm:keep=8", "sparsevlm:keep=8,layer=1", "fastv:keep=6,layer=1,merge=prop",
                "fastervlm:keep=8,merge=prop", "visionzip:keep=8,positions=compact"]


def test_per_request_reduction_batched_equals_generate(client, llava):
    """Requests with different reductions (before and inside the LLM) decode together, each as
    model.generate(..., reduce=spec) alone."""
    jobs = [(300 + i, PROMPTS[i % 4], REDUCE_SPECS[i % len(REDUCE_SPECS)]) for i in range(24)]
    refs = [llava.generate(images=[random_image(s)], prompts=[p], max_new_tokens=20, reduce=spec)[0]
            for s, p, spec in jobs]

    def ask(job):
        seed, prompt, spec = job
        return _ask(client, seed, prompt, max_tokens=20, temperature=0, extra_body={"reduce": spec} if spec else None)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(ask, jobs))
    for (_, _, spec), ref, r in zip(jobs, refs, results):
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), spec
        kept = (r.usage.prompt_tokens_details.model_extra or {}).get("visual_tokens")
        assert (kept is None) == (spec is None) and (kept is None or kept == ref.stats["visual_tokens"]), spec


def test_a_full_cache_drains_and_answers_stay_equal(llava):
    """With a cache of 96 slots, rows must drain before more requests fit (the cache restarts)."""
    jobs = [(400 + i, PROMPTS[i % 4], 8 + (i * 5) % 40) for i in range(24)]
    refs = [llava.generate(images=[random_image(s)], prompts=[p], max_new_tokens=n)[0] for s, p, n in jobs]
    with running_server(llava, Settings(model_id="tiny", max_batch_size=4, max_len=96)) as base:
        c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda job: _ask(c, job[0], job[1], max_tokens=job[2], temperature=0), jobs))
        health = raw_request(base, "GET", "/health")[1]
    assert [r.choices[0].message.content for r in results] == [ref.text for ref in refs]
    assert health["cache_restarts"] > 1 and health["finished"] == 24


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_fixed_shape_decode_serves_the_eager_answers(llava, mode):
    """With --decode static or compiled the server decodes through the fixed-shape step, over the
    first 128 or 256 slots as the cache fills, and answers as eager model.generate: rows of
    different lengths and reductions (before and inside the LLM, merged) come and go."""
    fixed = fastllava.load(llava.path, device="cpu", decode=mode)
    specs = REDUCE_SPECS if mode == "static" else [None, "fastv:keep=6,layer=1", "fastervlm:keep=8,merge=prop"]
    jobs = [(600 + i, PROMPTS[i % 4], specs[i % len(specs)], 4 + (i * 11) % 60) for i in range(2 * len(specs))]
    refs = [llava.generate(images=[random_image(s)], prompts=[p], max_new_tokens=n, reduce=spec)[0]
            for s, p, spec, n in jobs]

    def ask(job):
        seed, prompt, spec, n = job
        return _ask(c, seed, prompt, max_tokens=n, temperature=0, extra_body={"reduce": spec} if spec else None)

    with running_server(fixed, Settings(model_id="tiny", max_batch_size=4, max_len=256)) as base:
        c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(ask, jobs))
    for (_, _, spec, _), ref, r in zip(jobs, refs, results):
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref.text, ref.finish_reason), spec
    calls = fixed.runner.calls  # the server's prefills and steps took the fixed-shape path, none the eager one
    assert calls["fixed_prefill"] > 0 and calls["fixed_step"] > 0 and not calls["eager_prefill"] + calls["eager_step"]
    assert mode == "static" or {"run_stage", "decode_step"} <= set(fixed.runner.compiled)


def test_lone_requests_with_a_kivi_cache_equal_generate(tmp_path):
    """One request at a time (its row inserted at slot 0, KIVI groups aligned, so re-encoding is
    exact) answers as model.generate with the same quantized cache, past the residual window."""
    q = fastllava.load(tiny_checkpoint(tmp_path / "m"), device="cpu", kv_cache="kivi:bits=2,group=4,residual=4")
    jobs = [(500 + i, PROMPTS[i % 4], spec) for i, spec in enumerate([None, "fastv:keep=6,layer=1", None])]
    refs = [q.generate(images=[random_image(s)], prompts=[p], max_new_tokens=30, reduce=spec)[0] for s, p, spec in jobs]
    with running_server(q, Settings(model_id="tiny", max_batch_size=2)) as base:
        c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        results = [_ask(c, s, p, max_tokens=30, temperature=0, extra_body={"reduce": spec} if spec else None)
                   for s, p, spec in jobs]
    assert [r.choices[0].message.content for r in results] == [ref.text for ref in refs]


def _long_job(llava) -> tuple[int, int]:
    """(seed, max_tokens) of a greedy request that runs to its max_tokens (no EOS)."""
    for seed in range(200, 260):
        ref = llava.generate(images=[random_image(seed)], prompts=["describe it ."], max_new_tokens=200)[0]
        if ref.finish_reason == "length":
            return seed, 200
    raise AssertionError("no long-running prompt found")


def test_client_disconnect_frees_its_slot(llava, base):
    seed, max_tokens = _long_job(llava)
    host, port = base.removeprefix("http://").split(":")
    for stream in (True, False):
        before = raw_request(base, "GET", "/health")[1]["cancelled"]
        body = {"model": "tiny", "messages": user_message("describe it .", data_url(png_bytes(random_image(seed)))),
                "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        if stream:
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")  # the first chunk: it is running
        else:
            while raw_request(base, "GET", "/health")[1]["active"] == 0:
                pass  # until the request holds a row
        conn.sock.close()  # the client goes away mid-answer
        conn.close()
        while True:  # the row is freed (the scheduler counts it as cancelled) and nothing stays active
            h = raw_request(base, "GET", "/health")[1]
            if h["active"] == 0 and h["cancelled"] > before:
                break
        assert h["cancelled"] == before + 1


def test_full_queue_answers_429_and_server_recovers(llava):
    seed, max_tokens = _long_job(llava)
    url = data_url(png_bytes(random_image(seed)))
    with running_server(llava, Settings(model_id="tiny", max_batch_size=1, max_queue=2)) as base:
        c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

        def call(_):
            try:
                r = c.chat.completions.create(model="tiny", messages=user_message("describe it .", url),
                                              max_tokens=max_tokens, temperature=0)
                return r.choices[0].message.content
            except RateLimitError as e:
                assert e.status_code == 429 and e.body["code"] == "server_busy"
                return 429

        with ThreadPoolExecutor(12) as pool:
            out = list(pool.map(call, range(12)))
        ref = llava.generate(images=[random_image(seed)], prompts=["describe it ."], max_new_tokens=max_tokens)[0]
        assert 429 in out and ref.text in out and set(out) == {429, ref.text}
        assert c.chat.completions.create(model="tiny", messages=user_message("describe it .", url), max_tokens=3,
                                         temperature=0).choices[0].finish_reason in ("stop", "length")


def test_models_and_health(client, base):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status, body = raw_request(base, "GET", "/health")
    assert status == 200 and body["model"] == "tiny" and body["max_batch_size"] == 8


def test_file_and_http_image_urls_only_when_allowed(llava, tmp_path):
    import functools
    import http.server

    img = random_image(9)
    (tmp_path / "img.png").write_bytes(png_bytes(img))
    (tmp_path.parent / "outside.png").write_bytes(png_bytes(img))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    ref = llava.generate(images=[img], prompts=["what is it ?"], max_new_tokens=8)[0].text
    settings = Settings(model_id="tiny", allow_http_images=True, file_image_dir=tmp_path, max_batch_size=2)
    try:
        with running_server(llava, settings) as base:
            c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            for url in (f"file://{tmp_path}/img.png", f"http://127.0.0.1:{files.server_port}/img.png"):
                r = c.chat.completions.create(model="tiny", messages=user_message("what is it ?", url), max_tokens=8,
                                              temperature=0)
                assert r.choices[0].message.content == ref
            for url in (f"file://{tmp_path}/../outside.png", f"file://{tmp_path}/missing.png"):
                status, body = raw_request(base, "POST", "/v1/chat/completions",
                                           {"messages": user_message("what is it ?", url)})
                assert status == 400 and body["error"]["code"] == "url_not_allowed"
    finally:
        files.shutdown()


def test_cli_serve_defaults_and_errors(tmp_path):
    import subprocess
    import sys

    from fastllava.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.allow_http_images, args.allow_file_images) == \
        ("127.0.0.1", 8000, None, False, None)
    for bad, says in ((["--allow-file-images", str(tmp_path / "none")], "is not a folder"),
                      (["--reduce", "nosuch"], "--reduce"), (["--port", "0"], "--port"),
                      (["--kv-cache", "kivi:bits=3"], "kv_cache")):
        r = subprocess.run([sys.executable, "-m", "fastllava.cli", "serve", *bad], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
