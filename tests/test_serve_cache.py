"""The server's encoder and prefix caches: answers with the caches equal answers without them
(repeated requests, a multi-turn chat, a batch mixing hits and misses, a reduction, a quantized
KV cache, a prefix cache small enough to evict); two images behind identical text never share
image tokens; a chat's second turn reports the first turn's prompt as cached; /metrics counts
the hits (parsed with Prometheus' own parser)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import fastllava
from fastllava.generation.encoder_cache import EncoderCache, pixel_digest
from fastllava.serve.prefix_cache import BLOCK, PrefixCache, token_keys
from fastllava.serve.protocol import parse_chat
from fastllava.serve.settings import Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint

IMAGE = 32000  # any id standing for the image token in the unit tests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def _image(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(random_image(seed)))}}


def _user(text: str, *seeds: int) -> dict:
    return {"role": "user", "content": [_image(s) for s in seeds] + [{"type": "text", "text": text}]}


def _ask(base: str, messages: list[dict], **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}
    status, answer = raw_request(base, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def _text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def _cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def _metrics(base: str) -> dict[str, float]:
    status, text = raw_request(base, "GET", "/metrics")
    assert status == 200
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


# a shared system-style preamble long enough to fill blocks, then an image and a question
PREAMBLE = "what color is the circle ? how many red square are there ? describe it . " * 2


def _with_image(seed: int) -> list[dict]:
    """A text-only first turn, then a question about an image: the image comes after shared text."""
    return [_user(PREAMBLE), {"role": "assistant", "content": "red circle"}, _user("what is it ?", seed)]


def _workload(base: str, **extra) -> list[dict]:
    """Repeated requests, a two-turn chat, the same text before another image, and a concurrent
    batch mixing requests seen before with new ones."""
    out = []
    first = [_user(PREAMBLE + "what is the circle ?", 1)]
    out += [_ask(base, first, **extra) for _ in range(2)]
    chat = first + [{"role": "assistant", "content": _text(out[0])}, _user("how many are there ?", 2)]
    out.append(_ask(base, chat, **extra))
    out += [_ask(base, _with_image(seed), **extra) for seed in (1, 3)]
    batch = [first, [_user(PREAMBLE + "describe it .", 4)], chat, [_user("how many ?", 1)]]
    with ThreadPoolExecutor(4) as pool:
        out += list(pool.map(lambda m: _ask(base, m, **extra), batch))
    return out


def _serve(llava, **settings):
    return running_server(llava, Settings(model_id="tiny", max_batch_size=4, max_len=256, **settings))


@pytest.mark.parametrize("extra", [{}, {"reduce": "fastv:keep=8"}], ids=["plain", "reduced"])
def test_cached_answers_equal_uncached(checkpoint, extra):
    llava = fastllava.load(checkpoint, device="cpu")
    with _serve(llava, prefix_cache_mb=0, encoder_cache_mb=0) as base:
        plain = _workload(base, **extra)
    with _serve(llava) as base:
        cached = _workload(base, **extra)
        metrics = _metrics(base)
    assert [_text(a) for a in cached] == [_text(a) for a in plain]
    assert [a["usage"]["prompt_tokens"] for a in cached] == [a["usage"]["prompt_tokens"] for a in plain]
    assert all(_cached(a) == 0 for a in plain)
    assert metrics["fastllava_encoder_cache_hits_total"] > 0  # image 1 sent again, reduced or not
    if extra:  # a reduction's image tokens depend on the whole prompt: nothing is shared
        assert all(_cached(a) == 0 for a in cached)
        assert metrics["fastllava_prefix_cache_hits_total"] == 0
        return
    repeat, chat, other_image = cached[1], cached[2], cached[4]
    assert _cached(repeat) == repeat["usage"]["prompt_tokens"] - 1  # all but the last token
    # the second turn reuses the first turn's prompt and image, and the start of its answer (as far
    # as the random model's words, detokenized and tokenized again, give the same ids)
    assert _cached(chat) > cached[0]["usage"]["prompt_tokens"]
    # the same text before another image shares only the text before the image
    ids = llava.prompts.prompt_ids(parse_chat({"model": "tiny", "messages": _with_image(3)}, 4).prompt, 1, [16])
    assert 0 < _cached(other_image) <= ids.index(llava.config.image_token_index)
    assert metrics["fastllava_prefix_cache_hits_total"] >= 4
    assert metrics["fastllava_prefix_cache_cached_tokens_total"] == sum(_cached(a) for a in cached)


def test_quantized_cache_shares_images_not_prefixes(checkpoint):
    llava = fastllava.load(checkpoint, device="cpu", kv_cache="kivi:bits=4,group=8,residual=8")
    with _serve(llava, prefix_cache_mb=0, encoder_cache_mb=0) as base:
        plain = _workload(base)
    with _serve(llava) as base:
        cached = _workload(base)
        metrics = _metrics(base)
    assert [_text(a) for a in cached] == [_text(a) for a in plain]
    assert all(_cached(a) == 0 for a in cached)
    assert "fastllava_prefix_cache_hits_total" not in metrics
    assert metrics["fastllava_encoder_cache_hits_total"] > 0


def test_eviction_under_pressure_loses_nothing(checkpoint):
    llava = fastllava.load(checkpoint, device="cpu")
    with _serve(llava, prefix_cache_mb=0, encoder_cache_mb=0) as base:
        plain = _workload(base)
    # room for about two prompts' keys and values (1.5 KB a token) and two images: new ones evict old ones
    with _serve(llava, prefix_cache_mb=0.2, encoder_cache_mb=0.015) as base:
        cached = _workload(base)
        metrics = _metrics(base)
    assert [_text(a) for a in cached] == [_text(a) for a in plain]
    assert metrics["fastllava_prefix_cache_evictions_total"] > 0
    assert metrics["fastllava_prefix_cache_bytes"] <= 0.2 * 2**20
    assert metrics["fastllava_encoder_cache_bytes"] <= 0.015 * 2**20


def test_two_images_behind_the_same_text_never_share_image_tokens():
    text = list(range(40))
    ids = text + [IMAGE] * 24 + [7, 8, 9]
    a = token_keys(ids, IMAGE, [b"a" * 32], [24])
    b = token_keys(ids, IMAGE, [b"b" * 32], [24])
    cache = PrefixCache(2**20, "model")
    k = torch.randn(2, 1, len(ids), 4)  # [L, Hkv, N, Dh]
    cache.store(a, k, k)
    entry, reuse = cache.lookup(b)
    assert entry is not None and reuse == 40  # the text before the image, not one image token
    entry, reuse = cache.lookup(a + [5])
    assert reuse == len(ids) and torch.equal(entry.k[:, :, :reuse], k)
    # two images in a prompt: a token belongs to its own image
    two = token_keys([1, IMAGE, IMAGE, 2, IMAGE], IMAGE, [b"x", b"y"], [2, 1])
    assert two == [1, (b"x", 0), (b"x", 1), 2, (b"y", 0)]
    with pytest.raises(ValueError):
        token_keys([1, IMAGE], IMAGE, [b"x"], [2])


def test_prefix_cache_lookup_is_exact_to_the_token():
    cache = PrefixCache(2**20, "model")
    seq = list(range(2 * BLOCK + 5))
    k = torch.arange(len(seq), dtype=torch.float32).view(1, 1, -1, 1)  # slot i holds i
    cache.store(seq, k, -k)
    for n in (BLOCK, BLOCK + 3, 2 * BLOCK + 1, 2 * BLOCK + 5):  # prompts that share n tokens, then differ
        entry, reuse = cache.lookup(seq[:n] + [-1, -2])
        assert reuse == n and entry.k[0, 0, :reuse, 0].tolist() == list(range(n))
    assert cache.lookup(seq[:BLOCK - 1] + [-1, -2])[0] is None  # less than a block is not shared
    assert cache.lookup([-1] + seq)[0] is None  # a different first token shares nothing
    assert cache.lookup(seq[:BLOCK + 1])[1] == BLOCK  # the last token is always computed
    longer = seq + [100, 101]
    cache.store(longer, torch.zeros(1, 1, len(longer), 1), torch.zeros(1, 1, len(longer), 1))
    assert len(cache.entries) == 1 and cache.lookup(longer + [7])[1] == len(longer)  # it replaced the shorter one
    cache.store(seq, k, -k)
    assert len(cache.entries) == 1  # held already: not stored again
    with pytest.raises(ValueError):
        PrefixCache(0, "model")


def test_encoder_cache_equals_the_tower_and_is_bounded():
    torch.manual_seed(0)
    weight = torch.randn(12, 5)

    def tower(pixels, blocks=()):  # a stand-in tower: one row of output per row of pixels
        calls.append(pixels.shape[0])
        flat = pixels.flatten(1)  # [N, 12]
        return flat @ weight, flat.sum(1, keepdim=True) * (len(blocks) + 1)

    calls: list[int] = []
    pixels = torch.randn(4, 3, 2, 2)
    cache = EncoderCache(10_000)
    cached = cache.wrap(tower)
    first = cached(pixels)
    again = cached(torch.cat([pixels[2:], torch.randn(1, 3, 2, 2)]))  # two seen, one new
    with_blocks = cached(pixels[:1], (3,))  # other blocks asked for: another key
    assert calls == [4, 1, 1]
    for got, want in zip(first, tower(pixels)):
        assert torch.equal(got, want)
    assert torch.equal(again[0][:2], first[0][2:])
    assert torch.equal(with_blocks[1], tower(pixels[:1], (3,))[1])
    assert (cache.hits, cache.misses) == (2, 6)
    small = EncoderCache(2 * (5 + 1) * 4)  # room for two rows of outputs
    small.wrap(tower)(pixels)
    assert len(small.entries) == 2 and small.evictions == 2 and small.nbytes <= small.max_bytes
    assert pixel_digest(pixels[0]) != pixel_digest(pixels[0].to(torch.float64))  # the dtype is in the key
