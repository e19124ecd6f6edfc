"""A corpus of bad requests: each gets its status and an OpenAI error object, never a 500,
and the server still answers a good request afterwards."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

import fastllava
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
    ("negative max_tokens", "POST", "/v1/chat/completions", _chat(max_tokens=-1), AUTH, 400, "invalid_value"),
    ("zero max_completion_tokens", "POST", "/v1/chat/completions", _chat(max_completion_tokens=0), AUTH, 400,
     "invalid_value"),
    ("max_tokens a string", "POST", "/v1/chat/completions", _chat(max_tokens="10"), AUTH, 400, "invalid_type"),
    ("max_tokens over the limit", "POST", "/v1/chat/completions", _chat(max_tokens=10_000), AUTH, 400, "invalid_value"),
    ("max_tokens past the context", "POST", "/v1/chat/completions", _chat(max_tokens=250), AUTH, 400,
     "context_length_exceeded"),
    ("prompt past the context", "POST", "/v1/chat/completions",
     _chat(messages=user_message("what " * 300, GOOD_URL)), AUTH, 400, "context_length_exceeded"),
    ("temperature out of range", "POST", "/v1/chat/completions", _chat(temperature=5), AUTH, 400, "invalid_value"),
    ("temperature a bool", "POST", "/v1/chat/completions", _chat(temperature=True), AUTH, 400, "invalid_type"),
    ("top_p zero", "POST", "/v1/chat/completions", _chat(top_p=0), AUTH, 400, "invalid_value"),
    ("negative seed", "POST", "/v1/chat/completions", _chat(seed=-4), AUTH, 400, "invalid_value"),
    ("n = 2", "POST", "/v1/chat/completions", _chat(n=2), AUTH, 400, "unsupported_value"),
    ("five stop strings", "POST", "/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), AUTH, 400, None),
    ("empty stop string", "POST", "/v1/chat/completions", _chat(stop=[""]), AUTH, 400, "invalid_type"),
    ("stream not a bool", "POST", "/v1/chat/completions", _chat(stream="yes"), AUTH, 400, "invalid_type"),
    ("stream_options without stream", "POST", "/v1/chat/completions", _chat(stream_options={"include_usage": True}),
     AUTH, 400, None),
    ("unknown argument", "POST", "/v1/chat/completions", _chat(best_of=3), AUTH, 400, "unknown_parameter"),
    ("tools", "POST", "/v1/chat/completions", _chat(tools=[{"type": "function"}]), AUTH, 400, "unsupported_value"),
    ("assistant turn", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), AUTH, 400,
     "unsupported_value"),
    ("image in a system message", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": GOOD_URL}}]},
                     {"role": "user", "content": "x"}]), AUTH, 400, "unsupported_value"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    llava = fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("errors")), device="cpu")
    limits = Limits(max_body_bytes=500_000, max_image_bytes=200_000, max_images=2, max_tokens=1000)
    with running_server(llava, Settings(model_id="tiny", api_key=KEY, limits=limits, max_batch_size=2)) as url:
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
