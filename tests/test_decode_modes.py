"""The decode modes: the fixed-shape prefill and decode step (static, compiled) run, and give the
eager mode's tokens: plain, with padding, with reduction inside the language model (several cache
stages), with merged tokens' attention bias, compiled."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.errors import UserError
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation import CACHE_BUCKET, PREFILL_BUCKET, Runner
from fastllava.reduction.runtime import make_reduction
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

WORDS = ["user", "assistant", ":", "?", ".", "what", "color", "is", "the", "circle", "square", "red", "blue"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]
PROMPTS = ["what color is the circle ?", "what is the red square ?", "blue"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_checkpoint(tiny_llava(seed=21), tmp_path_factory.mktemp("fast"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return path


def _images():
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(2)] + [None]


def _tokens(model, mode: str, reduce=None, n: int = 12) -> list[list[int]]:
    """Greedy tokens in `mode`, checking that the mode's prefill and n - 1 steps ran."""
    if model.decode != mode:
        model.set_decode(mode)
    ids, mask, pixels = model.encode(_images(), PROMPTS)  # left-padded batch, one row without image
    before = model.runner.calls.copy()
    out = model.generate_ids(ids, pixels, mask, max_new_tokens=n, eos_token_id=None, reduce=reduce).tolist()
    kind = "fixed" if model.runner.fixed else "eager"
    assert model.runner.calls - before == {f"{kind}_prefill": 1, f"{kind}_step": n - 1}
    return out


@pytest.mark.parametrize("reduce", [None, "fastv:keep=5,layer=1", "pdrop:keep=8,layers=1-2",
                                    "dart:keep=5,layer=1,pivots=2,merge=prop", "fastervlm:keep=5,merge=prop"])
def test_static_decode_gives_the_eager_tokens(ckpt, reduce):
    model = fastllava.load(ckpt, device="cpu")
    eager = _tokens(model, "eager", reduce)
    assert len(set(map(tuple, eager))) > 1  # the rows differ, so a mixed-up row would show
    assert _tokens(model, "static", reduce) == eager


def test_static_decode_logits_match_eager(ckpt):
    model = fastllava.load(ckpt, device="cpu")
    ids, mask, pixels = model.encode(_images(), PROMPTS)
    out = {}
    for mode in ("eager", "static"):
        model.set_decode(mode)
        out[mode] = model.generate_ids(ids, pixels, mask, max_new_tokens=6, eos_token_id=None,
                                       temperature=1.0, seed=7)  # sampled: any logit error shifts the draws
    assert torch.equal(out["eager"], out["static"])


@pytest.mark.parametrize("rows", [3, 1])  # a padded batch (masked attention); one prompt (plain causal)
@pytest.mark.parametrize("reduce", ["fastv:keep=5,layer=1", "pdrop:keep=8,layers=1-2", "sparsevlm:keep=6,recycle=2",
                                    "dart:keep=5,layer=1,pivots=2,merge=prop"])
def test_fixed_prefill_runs_cuts_inside_the_language_model(ckpt, reduce, rows):
    """With a reduction inside the language model, the fixed-shape prefill pads every stage to the
    bucket (it ran, not the eager forward) and gives the eager prefill's logits and selections."""
    model = fastllava.load(ckpt, device="cpu")
    ids, mask, pixels = model.encode(_images()[:rows], PROMPTS[:rows])
    out = {}
    for mode in ("eager", "static"):
        runner = Runner(model.model, mode)
        reduction = make_reduction(reduce, model.model.cfg)
        with torch.inference_mode():
            logits, _, cache = runner.prefill(ids, mask, pixels, 4, reduction)
        out[mode] = logits, cache, reduction
    (eager, eager_cache, eager_red), (static, static_cache, static_red) = out["eager"], out["static"]
    assert static_cache.stages == eager_cache.stages and len(static_cache.stages) > 1
    assert all(static_cache.lengths[f] % PREFILL_BUCKET == 0 for f in static_cache.stages)
    assert [static_cache.lengths[f] for f in static_cache.stages] != [eager_cache.lengths[f] for f in eager_cache.stages]
    for a, b in zip(static_red.counts, eager_red.counts, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(static_red.owner, eager_red.owner)  # the same tokens kept and merged
    torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)


def test_sliding_window_decodes_eagerly_in_any_mode(tmp_path):
    """A Mistral decoder whose window (12) is shorter than the prompts (~24 tokens) and the answer:
    its window is a mask over slot positions (tests/test_parity.py checks it against transformers'),
    so the static mode runs it eagerly (bucket padding would put padding slots inside the window)
    and gives the same tokens."""
    hf = tiny_llava(text="mistral", kv_heads=2, seed=8, sliding_window=12)
    path = save_checkpoint(hf, tmp_path / "window", "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    model = fastllava.load(path, device="cpu")
    assert model.config.text.sliding_window == 12
    eager = _tokens(model, "eager", n=16)
    assert len(set(map(tuple, eager))) > 1
    assert _tokens(model, "static", n=16) == eager and not model.runner.fixed
    assert _tokens(model, "static", reduce="fastv:keep=5,layer=1", n=16) == _tokens(model, "eager",
                                                                                 reduce="fastv:keep=5,layer=1", n=16)


def test_quantized_cache_decodes_eagerly_in_any_mode(ckpt):
    model = fastllava.load(ckpt, device="cpu", kv_cache="kivi:bits=4,group=8,residual=8")
    static = _tokens(model, "static")
    assert not model.runner.fixed and model.runner.calls["fixed_step"] == 0
    assert static == _tokens(model, "eager")


def test_compiled_decode_gives_the_eager_tokens(ckpt):
    from torch._dynamo.utils import counters

    model = fastllava.load(ckpt, device="cpu", decode="compiled")
    assert model.runner.cache_size(CACHE_BUCKET + 1) == 2 * CACHE_BUCKET
    frames = counters["frames"]["ok"]
    compiled = _tokens(model, "compiled", n=6)
    assert set(model.runner.compiled) == {"encode_tower", "run_stage", "decode_step"}
    assert counters["frames"]["ok"] > frames  # torch.compile really compiled them (no silent eager fallback)
    runner = model.runner
    assert compiled == _tokens(model, "eager", n=6)
    model.runner = runner
    again = _tokens(model, "compiled", reduce="fastv:keep=5,layer=1", n=6)  # the same cache, reused and split
    assert len(runner._caches) == 1
    merged = "fastervlm:keep=5,merge=prop"  # proportional attention in the compiled prefill and step
    assert _tokens(model, "compiled", reduce=merged, n=6) == _tokens(model, "eager", reduce=merged, n=6)
    assert again == _tokens(model, "eager", reduce="fastv:keep=5,layer=1", n=6)


def test_unknown_decode_mode_is_a_clear_error(ckpt):
    with pytest.raises(UserError, match="unknown decode mode 'fast'; choose one of: eager, static, compiled"):
        fastllava.load(ckpt, device="cpu", decode="fast")
