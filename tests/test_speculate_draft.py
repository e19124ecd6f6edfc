"""Speculative decoding with a draft model (`draft:model=DIR`): greedy output identical to plain
greedy decoding (a batch of mixed lengths, with and without the draft seeing the image, a reduced
draft, a reduced target, the static mode); the target as its own draft keeps every draft; a
draft that disagrees still gives the target's tokens; a draft that cannot draft is one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.errors import UserError
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation.speculate import parse_speculate
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

WORDS = ["user", "assistant", ":", "?", ".", "what", "color", "is", "the", "circle", "square", "red", "blue"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]
PROMPTS = ["what color is the circle ? red red blue red red", "what is the red square ?", "blue blue"]


def _checkpoint(path, model):
    save_checkpoint(model, path, "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    target = _checkpoint(root / "target", tiny_llava(seed=31, num_hidden_layers=4))
    draft = _checkpoint(root / "draft", tiny_llava(seed=5, num_hidden_layers=1))
    return target, draft


@pytest.fixture(scope="module")
def model(paths):
    return fastllava.load(paths[0], device="cpu")


def _inputs(model):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in range(2)] + [None]
    return model.encode(images, PROMPTS)  # a left-padded batch, one row without an image


@pytest.mark.parametrize("options,reduce", [("", None), (",image=0", None), (",reduce=fastervlm:keep=4", None),
                                            (",k=2,adaptive=1", "fastv:keep=5,layer=1")])
def test_a_draft_model_gives_the_plain_greedy_tokens(model, paths, options, reduce):
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=20, eos_token_id=None, reduce=reduce)
    got = model.generate_ids(ids, pixels, mask, max_new_tokens=20, eos_token_id=None, reduce=reduce,
                             speculate=f"draft:model={paths[1]}{options}")
    assert torch.equal(got, plain)


def test_the_target_as_its_own_draft_keeps_every_draft(model, paths):
    out = model.generate(images=[None, None], prompts=["what is the red square ?", "blue blue"], max_new_tokens=21,
                         speculate=f"draft:model={paths[0]},k=4")
    plain = model.generate(images=[None, None], prompts=["what is the red square ?", "blue blue"], max_new_tokens=21)
    for got, want in zip(out, plain):
        s = got.stats["speculate"]
        assert got.token_ids == want.token_ids
        assert s["draft_tokens"] > 0 and s["acceptance"] == 1.0 and s["tokens_per_step"] == 5.0


def test_a_disagreeing_draft_is_rejected_and_the_output_stays_the_targets(model, paths):
    out = model.generate(images=[None], prompts=["what color is the circle ?"], max_new_tokens=24,
                         speculate=f"draft:model={paths[1]},k=3")[0]
    plain = model.generate(images=[None], prompts=["what color is the circle ?"], max_new_tokens=24)[0]
    assert out.token_ids == plain.token_ids
    assert out.stats["speculate"]["acceptance"] < 1.0  # a random 1-layer draft does not always agree


def test_a_draft_model_in_the_static_mode(model, paths):
    ids, mask, pixels = _inputs(model)
    plain = model.generate_ids(ids, pixels, mask, max_new_tokens=12, eos_token_id=None)
    model.set_decode("static")
    try:
        got = model.generate_ids(ids, pixels, mask, max_new_tokens=12, eos_token_id=None,
                                 speculate=f"draft:model={paths[1]}")
    finally:
        model.set_decode("eager")
    assert torch.equal(got, plain)


def test_draft_specs_and_drafts_that_cannot_draft_are_one_line_errors(model, paths, tmp_path):
    for bad, says in [("draft", "needs its model"), ("draft:model=x,n=2", "unknown option 'n'"),
                      ("draft:model=x,image=0,reduce=fastv", "image=0 leaves them out"),
                      ("draft:model=x,reduce=nosuch", "unknown reduction method")]:
        with pytest.raises(UserError, match=says):
            parse_speculate(bad, 4)
    other = _checkpoint(tmp_path / "other", tiny_llava(seed=5, num_hidden_layers=1, vocab_size=VOCAB + 8))
    with pytest.raises(UserError, match="same tokenizer"):
        model.generate(images=[None], prompts=["blue"], max_new_tokens=4, speculate=f"draft:model={other}")
    with pytest.raises(UserError) as e:
        model.generate(images=[None], prompts=["blue"], max_new_tokens=4, speculate=f"draft:model={tmp_path}/none")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options", ["", ",image=0,k=3", ",reduce=fastervlm:keep=4,adaptive=1"])
def test_the_server_drafts_with_a_draft_model(model, paths, options):
    """A server started with --speculate draft:model=DIR answers concurrent requests (more than its
    rows, so rows are seated again while others decode; images and text; a repeated prompt whose
    start comes from the prefix cache) with the greedy text of plain generate, and the verify
    passes ran."""
    from concurrent.futures import ThreadPoolExecutor

    from fastllava.serve.settings import Settings
    from serve_helpers import data_url, png_bytes, raw_request, running_server, user_message

    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    jobs = [(PROMPTS[i % 3], image if i % 2 else None, 6 + (i * 7) % 25) for i in range(7)]
    refs = [model.generate(images=[im], prompts=[p], max_new_tokens=n)[0].text for p, im, n in jobs]

    def ask(job):
        p, im, n = job
        urls = [data_url(png_bytes(im))] if im is not None else []
        return raw_request(base, "POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": n, "temperature": 0,
                                                                  "messages": user_message(p, *urls)})

    before = model.runner.calls["eager_multi_step"]
    settings = Settings(model_id="tiny", max_batch_size=3, max_len=256, speculate=f"draft:model={paths[1]}{options}")
    with running_server(model, settings) as base:
        with ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(ask, jobs))
        answers.append(ask(jobs[0]))  # its prompt again: the target starts from the prefix cache
    for (status, out), ref in zip(answers, refs + refs[:1]):
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == ref
    assert model.runner.calls["eager_multi_step"] > before


def test_the_server_with_the_target_as_its_own_draft_keeps_every_draft(model, paths):
    """The draft's cache follows the target's through seating, plain steps and rounds: with the
    target drafting for itself every drafted token is kept (the /metrics counters), with rows
    seated while others decode; a random 1-layer draft keeps fewer."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from fastllava.serve.settings import Settings
    from serve_helpers import raw_request, running_server, user_message

    jobs = [(PROMPTS[i % 3], 5 + (i * 11) % 30) for i in range(6)]
    counters = {}
    for name, draft in (("self", paths[0]), ("small", paths[1])):
        settings = Settings(model_id="tiny", max_batch_size=2, max_len=256, speculate=f"draft:model={draft},k=3")
        with running_server(model, settings) as base:
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda j: raw_request(base, "POST", "/v1/chat/completions", {
                    "model": "tiny", "max_tokens": j[1], "temperature": 0, "messages": user_message(j[0])}), jobs))
            text = raw_request(base, "GET", "/metrics")[1]
        assert all(status == 200 for status, _ in answers)
        counters[name] = {k: int(float(v)) for k, v in
                          re.findall(r"^fastllava_speculative_(\w+)_total (\S+)$", text, re.M)}
    assert counters["self"]["rounds"] > 0 and counters["self"]["draft_tokens"] > 0
    assert counters["self"]["accepted_tokens"] == counters["self"]["draft_tokens"]
    assert counters["small"]["accepted_tokens"] < counters["small"]["draft_tokens"]


def test_the_servers_draft_cache_follows_the_targets(model, paths):
    """Driving the server's scheduler step by step in a tight cache (so that rows join while
    others decode and plain steps come between rounds): after every step each row's draft cache
    holds the target's tokens but those it was not fed yet (pending), and greedy answers are
    plain generate's."""
    from fastllava.generation import SamplingParams
    from fastllava.serve.scheduler import Job, Scheduler

    jobs = [(PROMPTS[i % 3], 8 + (i * 11) % 25) for i in range(5)]
    done = {}
    scheduler = Scheduler(model, max_batch_size=2, max_queue=8, max_len=48,
                          speculate=parse_speculate(f"draft:model={paths[0]},k=3", 4),
                          drafter=model.drafter(parse_speculate(f"draft:model={paths[0]},k=3", 4)))
    for i, (p, n) in enumerate(jobs):
        ids = model.prompts.prompt_ids(p, 0)
        scheduler.waiting.append(Job(ids, None, None, SamplingParams(n), False,
                                     lambda e, i=i: done.__setitem__(i, e[1]) if e[0] == "done" else None))
    steps, drafter = 0, scheduler.drafter
    with torch.inference_mode():
        while scheduler.waiting or scheduler._active():
            scheduler._admit()
            scheduler._step()
            steps += 1
            for r in scheduler._active():
                target = int(scheduler.cache.valid[0, r.index, :scheduler.cache.length].sum())
                draft = int(drafter.cache.valid[0, r.index, :drafter.cache.length].sum())
                assert draft + len(drafter.pending[r.index]) == target, (steps, r.index)
    assert 0 < scheduler.rounds < steps  # rounds and plain steps both ran
    assert scheduler.accepted == scheduler.drafted > 0
    for i, (p, n) in enumerate(jobs):
        assert done[i].text == model.generate(images=[None], prompts=[p], max_new_tokens=n)[0].text
