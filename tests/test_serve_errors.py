"""A corpus of bad requests: each gets its status and an OpenAI error object, never a 500,
and the server still answers a good request afterwards."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

import fastllava
from fastllava.serve import content
from fastllava.serve.protocol import parse_chat
from fastllava.serve.settings import Limits, Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint, user_message

KEY = "sk-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD_URL = data_url(png_bytes(random_image(0)))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": user_message("what is it ?", GOOD_URL), "max_tokens": 4, **fields}


def _image_chat(url: str) -> dict:
    return _chat(messages=user_message("what is it ?", url))


def _raw(**numbers: str) -> bytes:
    """A good request's body with fields written as raw JSON text (NaN, 1e400: json.dumps cannot)."""
    body = json.dumps(_chat())[:-1]
    return (body + "".join(f', "{k}": {v}' for k, v in numbers.items()) + "}").encode()


FILES = Path(__file__).resolve().parent  # the server's --allow-file-images folder


TRUNCATED = png_bytes(random_image(1, (64, 64)))[:300]
NESTED = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

# (name, method, path, body, headers, status, code)
CASES = [
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', AUTH, 400, "invalid_json"),
    ("not UTF-8", "POST", "/v1/chat/completions", b"\xff\xfe{}", AUTH, 400, "invalid_json"),
    ("deeply nested JSON", "POST", "/v1/chat/completions", NESTED, AUTH, 400, None),
    ("body is an array", "POST", "/v1/chat/completions", b"[1, 2]", AUTH, 400, "invalid_type"),
    ("empty body", "POST", "/v1/chat/completions", b"", AUTH, 400, "invalid_json"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "tiny"}, AUTH, 400, None),
    ("messages is a string", "POST", "/v1/chat/completions", _chat(messages="hi"), AUTH, 400, None),
    ("messages empty", "POST", "/v1/chat/completions", _chat(messages=[]), AUTH, 400, None),
    ("message not an object", "POST", "/v1/chat/completions", _chat(messages=["hi"]), AUTH, 400, "invalid_type"),
    ("unknown role", "POST", "/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), AUTH, 400, None),
    ("content is a number", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": 3}]), AUTH, 400,
     "invalid_type"),
    ("unknown part type", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), AUTH, 400, "unsupported_value"),
    ("text part not a string", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]), AUTH, 400, "invalid_type"),
    ("image part without url", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), AUTH, 400,
     "missing_required_parameter"),
    ("bad base64", "POST", "/v1/chat/completions", _image_chat("data:image/png;base64,@@not*base64!!"), AUTH, 400,
     "invalid_base64"),
    ("data URL not base64", "POST", "/v1/chat/completions", _image_chat("data:image/png,rawbytes"), AUTH, 400,
     "invalid_image_url"),
    ("data URL of text", "POST", "/v1/chat/completions", _image_chat(data_url(b"hello", "text/plain")), AUTH, 400,
     "invalid_image_url"),
    ("not an image", "POST", "/v1/chat/completions", _image_chat(data_url(b"this is not an image at all")), AUTH, 422,
     "invalid_image"),
    ("truncated PNG", "POST", "/v1/chat/completions", _image_chat(data_url(TRUNCATED)), AUTH, 422, "invalid_image"),
    ("20000x20000 image", "POST", "/v1/chat/completions", _image_chat(data_url(_png_header(20000, 20000))), AUTH, 413,
     "image_too_large"),
    ("5000x5000 image over the pixel limit", "POST", "/v1/chat/completions",
     _image_chat(data_url(_png_header(5000, 5000))), AUTH, 413, "image_too_large"),
    ("1x3000 image", "POST", "/v1/chat/completions", _image_chat(data_url(png_bytes(random_image(2, (3000, 1))))),
     AUTH, 422, "invalid_image"),
    ("image over the byte limit", "POST", "/v1/chat/completions",
     _image_chat("data:image/png;base64," + base64.b64encode(b"\0" * 300_000).decode()), AUTH, 413, "image_too_large"),
    ("too many images", "POST", "/v1/chat/completions", _chat(messages=user_message("x", *[GOOD_URL] * 3)), AUTH, 400,
     "too_many_images"),
    ("http image URL", "POST", "/v1/chat/completions", _image_chat("http://127.0.0.1:9/x.png"), AUTH, 400,
     "url_not_allowed"),
    ("file image URL", "POST", "/v1/chat/completions", _image_chat("file:///etc/passwd"), AUTH, 400, "url_not_allowed"),
    ("file URL of a folder", "POST", "/v1/chat/completions", _image_chat(f"file://{FILES}"), AUTH, 400,
     "url_not_allowed"),
    ("ftp image URL", "POST", "/v1/chat/completions", _image_chat("ftp://example/x.png"), AUTH, 400, "invalid_image_url"),
    ("oversized body", "POST", "/v1/chat/completions", b'{"x": "' + b"a" * 600_000 + b'"}', AUTH, 413, "body_too_large"),
    ("missing key", "POST", "/v1/chat/completions", _chat(), {}, 401, "missing_api_key"),
    ("wrong key", "POST", "/v1/chat/completions", _chat(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("models without key", "GET", "/v1/models", None, {}, 401, "missing_api_key"),
    ("unknown model", "POST", "/v1/chat/completions", _chat(model="gpt-4o"), AUTH, 404, "model_not_found"),
    ("unknown model card", "GET", "/v1/models/gpt-4o", None, AUTH, 404, "model_not_found"),
    ("unknown route", "GET", "/v1/nothing", None, AUTH, 404, "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", None, AUTH, 405, "method_not_allowed"),
    ("unknown reduction method", "POST", "/v1/chat/completions", _chat(reduce="nosuchmethod:keep=3"), AUTH, 400,
     "invalid_reduction"),
    ("bad reduction parameter", "POST", "/v1/chat/completions", _chat(reduce="visionzip:keep=many"), AUTH, 400,
     "invalid_reduction"),
    ("reduction keeping more than the image has", "POST", "/v1/chat/completions", _chat(reduce="fastv:keep=999"),
     AUTH, 400, "invalid_reduction"),
    ("reduction spec not a string", "POST", "/v1/chat/completions", _chat(reduce=5), AUTH, 400, "invalid_type"),
    ("reduction seed over 64 bits", "POST", "/v1/chat/completions", _chat(reduce=f"random:keep=8,seed={2**70}"), AUTH,
     400, "invalid_reduction"),
    ("reduction parameter given twice", "POST", "/v1/chat/completions", _chat(reduce="fastv:keep=8,keep=9"), AUTH, 400,
     "invalid_reduction"),
    ("sparsevlm recycle=-5", "POST", "/v1/chat/completions", _chat(reduce="sparsevlm:keep=8,recycle=-5"), AUTH, 400,
     "invalid_reduction"),
    ("reduction NaN parameter", "POST", "/v1/chat/completions", _chat(reduce="pdrop:keep=8,ratio=nan"), AUTH, 400,
     "invalid_reduction"),
    ("negative max_tokens", "POST", "/v1/chat/completions", _chat(max_tokens=-1), AUTH, 400, "invalid_value"),
    ("zero max_completion_tokens", "POST", "/v1/chat/completions", _chat(max_completion_tokens=0), AUTH, 400,
     "invalid_value"),
    ("max_tokens a string", "POST", "/v1/chat/completions", _chat(max_tokens="10"), AUTH, 400, "invalid_type"),
    ("max_tokens over the limit", "POST", "/v1/chat/completions", _chat(max_tokens=10_000), AUTH, 400, "invalid_value"),
    ("prompt past the context", "POST", "/v1/chat/completions",
     _chat(messages=user_message("what " * 300, GOOD_URL)), AUTH, 400, "context_length_exceeded"),
    ("temperature out of range", "POST", "/v1/chat/completions", _chat(temperature=101), AUTH, 400, "invalid_value"),
    ("temperature a bool", "POST", "/v1/chat/completions", _chat(temperature=True), AUTH, 400, "invalid_type"),
    ("temperature 1e400 (inf)", "POST", "/v1/chat/completions", _raw(temperature="1e400"), AUTH, 400, "invalid_value"),
    ("temperature NaN", "POST", "/v1/chat/completions", _raw(temperature="NaN"), AUTH, 400, "invalid_value"),
    ("top_p -Infinity", "POST", "/v1/chat/completions", _raw(top_p="-Infinity"), AUTH, 400, "invalid_value"),
    ("top_p over 1", "POST", "/v1/chat/completions", _chat(top_p=1.5), AUTH, 400, "invalid_value"),
    ("negative top_p", "POST", "/v1/chat/completions", _chat(top_p=-1e-300), AUTH, 400, "invalid_value"),
    ("negative seed", "POST", "/v1/chat/completions", _chat(seed=-4), AUTH, 400, "invalid_value"),
    ("seed over 63 bits", "POST", "/v1/chat/completions", _chat(seed=2**63), AUTH, 400, "invalid_value"),
    ("n = 2", "POST", "/v1/chat/completions", _chat(n=2), AUTH, 400, "unsupported_value"),
    ("n = true", "POST", "/v1/chat/completions", _chat(n=True), AUTH, 400, "invalid_type"),
    ("n = 1.0", "POST", "/v1/chat/completions", _chat(n=1.0), AUTH, 400, "invalid_type"),
    ("logprobs = 0", "POST", "/v1/chat/completions", _chat(logprobs=0), AUTH, 400, "invalid_type"),
    ("lone surrogate in the text", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "what \ud800 is it ?"}]), AUTH, 400, "invalid_json"),
    ("lone surrogate in a key", "POST", "/v1/chat/completions", _chat(metadata={"\udfff": "x"}), AUTH, 400,
     "invalid_json"),
    ("lone surrogate in the model", "POST", "/v1/chat/completions", _chat(model="\ud800"), AUTH, 400, "invalid_json"),
    ("NUL in a file URL", "POST", "/v1/chat/completions", _image_chat(f"file://{FILES}/a\u0000.png"), AUTH, 400,
     "invalid_image_url"),
    ("file URL outside the folder", "POST", "/v1/chat/completions", _image_chat("file:///etc/hostname"), AUTH, 400,
     "url_not_allowed"),
    ("five stop strings", "POST", "/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), AUTH, 400, None),
    ("empty stop string", "POST", "/v1/chat/completions", _chat(stop=[""]), AUTH, 400, "invalid_type"),
    ("stream not a bool", "POST", "/v1/chat/completions", _chat(stream="yes"), AUTH, 400, "invalid_type"),
    ("stream_options without stream", "POST", "/v1/chat/completions", _chat(stream_options={"include_usage": True}),
     AUTH, 400, None),
    ("unknown argument", "POST", "/v1/chat/completions", _chat(best_of=3), AUTH, 400, "unknown_parameter"),
    ("tools", "POST", "/v1/chat/completions", _chat(tools=[{"type": "function"}]), AUTH, 400, "unsupported_value"),
    ("assistant message last", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), AUTH, 400,
     "unsupported_value"),
    ("assistant message first", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]), AUTH, 400,
     "invalid_value"),
    ("tool message", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}, {"role": "user", "content": "x"}]),
     AUTH, 400, "unsupported_value"),
    ("image in an assistant message", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": [
         {"type": "image_url", "image_url": {"url": GOOD_URL}}]}, {"role": "user", "content": "x"}]), AUTH, 400,
     "unsupported_value"),
    ("image in a system message", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": GOOD_URL}}]},
                     {"role": "user", "content": "x"}]), AUTH, 400, "unsupported_value"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    llava = fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("errors")), device="cpu")
    limits = Limits(max_body_bytes=500_000, max_image_bytes=200_000, max_images=2, max_tokens=1000)
    with running_server(llava, Settings(model_id="tiny", api_key=KEY, limits=limits, max_batch_size=2,
                                        file_image_dir=FILES)) as url:
        yield url


def test_corpus_is_large():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name,method,path,body,headers,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request(base, name, method, path, body, headers, status, code):
    got, obj = raw_request(base, method, path, body, headers)
    assert got == status, obj
    assert isinstance(obj, dict) and set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert "\n" not in err["message"] and isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, err


def test_good_request_after_the_corpus(base):
    for _name, method, path, body, headers, _status, _code in CASES:
        raw_request(base, method, path, body, headers)
    status, obj = raw_request(base, "POST", "/v1/chat/completions", _chat(temperature=0), AUTH)
    assert status == 200 and obj["choices"][0]["finish_reason"] in ("stop", "length"), obj
    status, obj = raw_request(base, "GET", "/health")
    assert status == 200 and obj["active"] == 0


def test_an_image_preprocessing_would_blow_up_is_a_422(tmp_path):
    """With pad_to_square, a 9000x900 image (within the server's limits) would become an 81 M
    pixel canvas: refused as invalid_image, not a 500."""
    from PIL import Image

    llava = fastllava.load(tiny_checkpoint(tmp_path / "m"), device="cpu", pad_to_square=True)
    with running_server(llava, Settings(model_id="tiny")) as url:
        status, obj = raw_request(url, "POST", "/v1/chat/completions",
                                  _image_chat(data_url(png_bytes(Image.new("RGB", (9000, 900))))))
    assert status == 422 and obj["error"]["code"] == "invalid_image" and "9000x9000" in obj["error"]["message"], obj


@pytest.mark.parametrize("body, param, words", [
    (_raw(temperature="NaN"), "temperature", ["finite", "got NaN"]),
    (_raw(top_p="1e400"), "top_p", ["finite", "got Infinity"]),
    (_chat(temperature=101), "temperature", ["[0, 100]"]),
    (_chat(reduce="sparsevlm:keep=8,recycle=-5"), "reduce", ["recycle must be in 0..keep-1", "or -1"]),
    (_chat(reduce="fastv:keep=8,keep=9"), "reduce", ["'keep' is given twice"]),
    (_chat(reduce=f"random:keep=8,seed={2**70}"), "reduce", ["seed=", "[-2**63, 2**63)"]),
    (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}]),
     "messages[0].content[0].text", ["lone surrogate"]),
])
def test_messages_say_what_is_wrong(base, body, param, words):
    status, obj = raw_request(base, "POST", "/v1/chat/completions", body, AUTH)
    assert status == 400 and obj["error"]["param"] == param, obj
    for w in words:
        assert w in obj["error"]["message"], obj


def test_top_p_zero_or_too_small_for_float32_is_greedy(base):
    """top_p=0 keeps the most likely token only (greedy); so does a top_p that float32 rounds to 0."""
    answers = []
    for fields in ({"temperature": 0}, {"temperature": 1, "top_p": 0, "seed": 1}, {"temperature": 1, "top_p": 1e-300}):
        status, obj = raw_request(base, "POST", "/v1/chat/completions", _chat(max_tokens=6, **fields), AUTH)
        assert status == 200, obj
        answers.append(obj["choices"][0]["message"]["content"])
    assert answers[1] == answers[0] and answers[2] == answers[0]


def test_system_text_goes_before_the_users_wherever_it_stands(base):
    """As docs/server.md says: the system and developer messages' text, in order, then the user's."""
    user = {"role": "user", "content": "what is it ?"}
    system, developer = {"role": "system", "content": "describe"}, {"role": "developer", "content": "red blue"}
    orders = [[system, developer, user], [system, user, developer], [user, system, developer]]
    assert {parse_chat({"messages": m}, 1).prompt for m in orders} == {"describe\nred blue\nwhat is it ?"}
    answers = set()
    for messages in orders:
        status, obj = raw_request(base, "POST", "/v1/chat/completions", _chat(messages=messages, temperature=0), AUTH)
        assert status == 200, obj
        answers.add(obj["choices"][0]["message"]["content"])
    assert len(answers) == 1


def _drip_server(headers: bytes, seconds: float):
    """A one-connection HTTP server on 127.0.0.1 that sends `headers`, then one byte every 50 ms for
    `seconds` at most (it stops by itself, or when the client goes away). -> (URL, thread)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(seconds)

    def run():
        with srv:
            try:
                conn, _ = srv.accept()
            except OSError:  # nobody came
                return
            with conn:
                conn.settimeout(seconds)
                try:
                    conn.recv(65536)
                    conn.sendall(headers)
                    for _ in range(int(seconds / 0.05)):
                        conn.sendall(b"a")
                        time.sleep(0.05)
                except OSError:  # the client hung up
                    pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/x.png", thread


@pytest.mark.parametrize("headers", [b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nX-Slow: "], ids=["body", "headers"])
def test_a_drip_fed_http_image_fails_within_the_deadline(tmp_path, monkeypatch, headers):
    """With --allow-http-images, a URL that sends a byte every 50 ms (each read well within any
    per-read timeout) is cut at the fetch's deadline over the whole download: a 400."""
    monkeypatch.setattr(content, "FETCH_TIMEOUT_S", 1.0)
    llava = fastllava.load(tiny_checkpoint(tmp_path / "m"), device="cpu")
    url, thread = _drip_server(headers, seconds=8)
    with running_server(llava, Settings(model_id="tiny", allow_http_images=True)) as base:
        t0 = time.perf_counter()
        status, obj = raw_request(base, "POST", "/v1/chat/completions", _image_chat(url))
        took = time.perf_counter() - t0
        assert status == 400 and obj["error"]["code"] == "image_fetch_timeout", obj
        assert took < 3, took
        status, obj = raw_request(base, "POST", "/v1/chat/completions", _chat(temperature=0))
        assert status == 200, obj
    thread.join(10)
    assert not thread.is_alive()
