"""A tiny checkpoint with a word tokenizer, a server on a free loopback port in this process,
images as data: URLs, and raw HTTP calls for requests the openai client will not send."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import uvicorn
from PIL import Image

from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.serve.app import create_app
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

WORDS = "user assistant : ? . what color is the circle square red blue green how many are there describe it".split()


def tiny_checkpoint(path):
    """A random tiny LLaVA (16 visual tokens, 32 px images, 256 positions) with every id a word."""
    save_checkpoint(tiny_llava(seed=23), path, "new")
    words = WORDS + [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]
    build_word_tokenizer(words, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 32},
                                                               "crop_size": {"height": 32, "width": 32}}))
    return path


@contextmanager
def running_server(llava, settings):
    """Yields the base URL of a uvicorn server running create_app(llava, settings) on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # keep-alive longer than any test's pause between requests: a pooled connection that uvicorn
    # closes (default 5 s idle) just as the client reuses it reads as "server disconnected" on a
    # loaded machine, and the tests' clients do not retry
    server = uvicorn.Server(uvicorn.Config(create_app(llava, settings), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_keep_alive=120))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def user_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def raw_request(base: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON or raw text) of one request sent as given."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text
