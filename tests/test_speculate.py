"""Speculative decoding: greedy output identical to plain greedy decoding with every drafter (batches
of mixed lengths, token reduction, every decode mode), the sampling rule keeps the model's
distribution, and bad specs are one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.errors import UserError
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation import SamplingParams
from fastllava.generation.sampling import probabilities
from fastllava.generation.speculate import accept, ngram_draft, parse_speculate
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

WORDS = ["user", "assistant", ":", "?", ".", "what", "color", "is", "the", "circle", "square", "red", "blue"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]
PROMPTS = ["what color is the circle ? red red blue red red", "what is the red square ?", "blue blue"]
SPECS = ["ngram", "ngram:n=1,k=6,adaptive=1", "layerskip", "layerskip:skip=1,k=2,adaptive=1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(tiny_llava(seed=31, num_hidden_layers=4), tmp_path_factory.mktemp("spec"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return fastllava.load(path, device="cpu")


def _inputs(model):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in range(2)] + [None]
    return model.encode(images, PROMPTS)  # a left-padded batch, one row without an image


@pytest.mark.parametrize("reduce", [None, "fastv:keep=5,layer=1", "fastervlm:keep=5,merge=prop"])
@pytest.mark.parametrize("spec", SPECS)
def test_greedy_speculation_gives_the_plain_greedy_tokens(model, spec, reduce):
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=None, reduce=reduce)
    assert len(set(map(tuple, plain.tolist()))) > 1
    before = model.runner.calls.copy()
    got = model.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=None, reduce=reduce, speculate=spec)
    assert torch.equal(got, plain)
    assert (model.runner.calls - before)["eager_multi_step"] > 0  # verify passes ran


def test_speculation_drafts_and_accepts_on_repetitive_text(model):
    """The tiny random model repeats itself: n-gram drafts are kept, fewer passes than tokens."""
    out = model.generate(images=[None], prompts=["blue blue"], max_new_tokens=40, speculate="ngram:n=2,k=4")[0]
    s = out.stats["speculate"]
    assert s["draft_tokens"] > 0 and s["accepted_tokens"] > 0 and s["tokens_per_step"] > 1
    assert out.token_ids == model.generate(images=[None], prompts=["blue blue"], max_new_tokens=40)[0].token_ids


def test_speculation_in_the_static_mode_runs_the_fixed_shape_verify(model):
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None)
    model.set_decode("static")
    try:
        got = model.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None, speculate="layerskip")
        assert model.runner.calls["fixed_multi_step"] > 0 and model.runner.calls["fixed_prefill"] == 1
    finally:
        model.set_decode("eager")
    assert torch.equal(got, plain)


def test_eos_and_stop_strings_end_a_speculative_row_where_plain_decoding_does(model):
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=None)
    eos = int(plain[0, 5])  # a token the first row produces at step 5
    ref = model.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=eos)
    assert torch.equal(model.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=eos, speculate="ngram"),
                       ref)


def test_the_acceptance_rule_keeps_the_model_distribution():
    """A drafted token d is kept with probability p(d), else replaced by a draw from p without d:
    the first token out is distributed as p (checked over 40 000 rows, total variation < 0.015),
    for a likely and for an unlikely draft."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 12, generator=gen) * 2  # [1, K + 1, V]
    params = SamplingParams(temperature=0.8, top_k=8).validate()
    p = probabilities(logits[0, 0], params)
    for draft in (int(p.argmax()), int(p.argmin())):
        n = 40_000
        drafts = torch.tensor([[draft, 3]]).expand(n, 2)
        kept, nxt = accept(logits.expand(n, -1, -1), drafts, torch.full((n,), 2), params, gen)
        first = torch.where(kept > 0, drafts[:, 0], nxt)
        freq = torch.bincount(first, minlength=12).float() / n
        assert 0.5 * float((freq - p).abs().sum()) < 0.015


def test_sampled_speculation_matches_plain_sampling_in_distribution(model):
    """End to end at temperature 1: the third answer token's frequencies over 256 sampled rows, with
    and without speculation, differ by a total variation below 0.25 (sampling noise at this size is
    about 0.1; a rule that kept every draft would move it far more)."""
    ids, mask, pixels = model.encode([None] * 256, ["red red blue red red"] * 256)
    freqs = []
    for spec in (None, "ngram:n=1,k=3"):
        out = model.generate_ids(ids, pixels, mask, max_new_tokens=3, eos_token_id=None, temperature=1.0, seed=11,
                                 speculate=spec)
        freqs.append(torch.bincount(out[:, 2], minlength=VOCAB).float() / out.shape[0])
    assert 0.5 * float((freqs[0] - freqs[1]).abs().sum()) < 0.25


def test_ngram_draft_continues_the_latest_earlier_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, 2) == [7, 8]
    assert ngram_draft([5, 6, 7, 5], 3, 4) == [6, 7, 5]  # falls back to a 1-token match
    assert ngram_draft([1, 2, 3], 2, 4) == []
    assert ngram_draft([4, 2, 2, 2, 2, 2], 2, 3) == [2, 2, 2]  # not the latest match, followed by one token only


@pytest.mark.parametrize("spec,message", [
    ("medusa", "unknown speculation 'medusa'"), ("ngram:k=0", "k must be in 1..16"),
    ("ngram:q=1", "unknown option 'q'"), ("layerskip:skip=0", "skip must list distinct layers in 1..2"),
    ("layerskip:skip=x", "skip=x is not valid"), ("ngram:adaptive=2", "adaptive=2 is not valid")])
def test_bad_speculation_specs_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_speculate(spec, 4)


@pytest.mark.parametrize("kv", ["kivi:bits=4,group=8,residual=8", "kivi:bits=2,group=4,residual=4", "vidkv"])
@pytest.mark.parametrize("spec", ["ngram:k=5", "layerskip:k=3"])
def test_a_quantized_kv_cache_speculates_and_gives_its_plain_tokens(model, kv, spec):
    """Rejected drafts are dropped before they are quantized, so the kept tokens are quantized in
    the groups plain decoding gives them: the same greedy tokens at batch 1, over many group and
    residual boundaries."""
    q = fastllava.load(model.path, device="cpu", kv_cache=kv)
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    kept = 0
    for image_, prompt in [(None, "red red blue red red"), (image, "what color is the circle ?")]:
        plain = q.generate(images=[image_], prompts=[prompt], max_new_tokens=40)[0]
        got = q.generate(images=[image_], prompts=[prompt], max_new_tokens=40, speculate=spec)[0]
        assert got.token_ids == plain.token_ids
        kept += got.stats["speculate"]["accepted_tokens"]
    assert kept > 0  # drafts were kept, so rounds ended with tokens both kept and dropped


@pytest.mark.parametrize("spec", ["ngram:k=3", "layerskip:k=2,adaptive=1"])
def test_the_server_speculates_and_answers_as_generate(model, spec):
    """Continuous batching with speculation: rows of different lengths come and go, greedy rows
    answer exactly as plain generate, a sampled row as generate with the same seed would only
    in distribution (so it is only checked to finish)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastllava.serve.settings import Settings
    from serve_helpers import raw_request, running_server

    prompts = ["blue blue", "what color is the circle ? red red", "red red blue red red", "what is the red square ?"]
    jobs = [(prompts[i % 4], 6 + (i * 7) % 30) for i in range(8)]
    refs = [model.generate(images=[None], prompts=[p], max_new_tokens=n)[0] for p, n in jobs]
    body = lambda p, n: {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": n,  # noqa: E731
                         "temperature": 0}
    before = model.runner.calls["eager_multi_step"]
    with running_server(model, Settings(model_id="tiny", max_batch_size=3, max_len=256, speculate=spec)) as base:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: raw_request(base, "POST", "/v1/chat/completions", body(*j)), jobs))
        status, sampled = raw_request(base, "POST", "/v1/chat/completions",
                                      {**body("blue blue", 20), "temperature": 1.0, "seed": 3})
    assert status == 200 and sampled["choices"][0]["finish_reason"] in ("stop", "length")
    for (status, out), ref in zip(answers, refs):
        assert status == 200, out
        assert (out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]) == (ref.text,
                                                                                                ref.finish_reason)
    assert model.runner.calls["eager_multi_step"] > before  # verify passes ran in the server


def test_the_server_speculates_with_a_quantized_cache(model):
    """Lone requests (each row alone in the cache, from slot 0) with ngram drafts over a KIVI cache
    answer as generate with the same cache does without speculation."""
    from fastllava.serve.settings import Settings
    from serve_helpers import raw_request, running_server

    q = fastllava.load(model.path, device="cpu", kv_cache="kivi:bits=4,group=4,residual=4")
    jobs = [("red red blue red red", 40), ("blue blue", 33), ("what color is the circle ? red red", 25)]
    refs = [q.generate(images=[None], prompts=[p], max_new_tokens=n)[0] for p, n in jobs]
    with running_server(q, Settings(model_id="tiny", max_batch_size=2, max_len=256, speculate="ngram:k=4")) as base:
        answers = [raw_request(base, "POST", "/v1/chat/completions",
                               {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": n,
                                "temperature": 0}) for p, n in jobs]
    for (status, out), ref in zip(answers, refs):
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == ref.text
    assert q.runner.calls["eager_multi_step"] > 0


def test_cli_run_speculates_and_reports_its_drafts(capsys):
    from fastllava.cli import main

    args = ["run", "--image", "examples/shapes_2.png", "--prompt", "What shape is the purple object? Answer with one "
            "word.", "--reduce", "dart:keep=64", "--speculate", "ngram:k=3"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["speculate"]["spec"] == "ngram:n=3,k=3" and out["stats"]["visual_tokens"] == [576, 64]
    assert main(args) == 0
    assert "(576 -> 64 in the LLM)" in capsys.readouterr().err
    assert main(args[:-1] + ["ngram:k=0"]) == 2 and "k must be in 1..16" in capsys.readouterr().err


def test_serve_checks_its_speculation_before_serving(capsys):
    from fastllava.cli import main

    assert main(["serve", "--speculate", "medusa", "--port", "18931"]) == 2
    assert "unknown speculation 'medusa'" in capsys.readouterr().err
    assert main(["serve", "--speculate", "draft:model=/nonexistent/draft", "--port", "18931"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/draft" in err and len(err.strip().splitlines()) == 1 and "serving" not in err


def test_speculation_in_the_compiled_mode_gives_the_plain_tokens(model):
    """The verify pass (and layerskip's draft pass) through the compiled fixed-shape decode step."""
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=12, eos_token_id=None)
    model.set_decode("compiled")
    try:
        for spec in ("ngram:k=3", "layerskip:k=2"):
            got = model.generate_ids(ids, pixels, mask, max_new_tokens=12, eos_token_id=None, speculate=spec)
            assert torch.equal(got, plain), spec
        assert model.runner.calls["fixed_multi_step"] > 0 and "decode_step" in model.runner.compiled
    finally:
        model.set_decode("eager")
