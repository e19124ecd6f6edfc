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
