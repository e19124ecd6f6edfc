"""The 2025 subset-selection methods before the language model (divprune, vispruner, cdpruner,
mmtok) on the tiny random models of test_reduction.py and test_reduction_next.py: full budgets are
exact, budgets hold per sample in a padded batch, batches equal single prompts, bad parameters are
one-line errors, and each method's defining behaviour on crafted features."""

import json

import pytest
import torch
import torch.nn.functional as F

import fastllava
from fastllava.cli import main
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.reduction import METHODS
from fastllava.reduction.base import VisionContext
from fastllava.reduction.runtime import make_reduction
from hf_reference import IMAGE_TOKEN, PINPOINTS, VOCAB, save_checkpoint, tiny_llava
from test_llava_next import PROCESSOR
from test_llava_next import WORDS as NEXT_WORDS
from test_llava_next import _photo
from test_reduction import (P, _image, check_batch_equals_alone, check_budgets, check_full_budget,  # noqa: F401
                            model)  # the tiny LLaVA-1.5 checkpoint fixture

NEW = ["divprune", "vispruner", "cdpruner", "mmtok"]
FULL = {"divprune": "divprune:keep=16", "vispruner": "vispruner:keep=16", "cdpruner": "cdpruner:keep=16",
        "mmtok": "mmtok:keep=16", "vispruner+prop": "vispruner:keep=16,merge=prop",
        "mmtok+compact": "mmtok:keep=16,positions=compact"}
SMALL = {"divprune": "divprune:keep=5", "vispruner": "vispruner:keep=6", "cdpruner": "cdpruner:keep=5",
         "mmtok": "mmtok:keep=5", "vispruner+r0": "vispruner:keep=5,ratio=0", "mmtok+a0": "mmtok:keep=5,alpha=0",
         "divprune+prop": "divprune:keep=5,merge=prop", "cdpruner+mean": "cdpruner:keep=5,merge=mean"}


def test_the_new_methods_are_registered_before_the_llm():
    for name in NEW:
        assert METHODS[name].where == "vision" and METHODS[name].images == "any"
        assert METHODS[name].needs_cls == (name == "vispruner")


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_budget_reproduces_unreduced_logits(model, name):  # noqa: F811
    check_full_budget(model, FULL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_budget_holds_for_every_sample(model, name):  # noqa: F811
    check_budgets(model, SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_of_four_equals_each_alone(model, name):  # noqa: F811
    check_batch_equals_alone(model, SMALL[name])


@pytest.mark.parametrize("spec, words", [
    ("divprune:kep=3", ["unknown parameter", "keep", "merge"]),
    ("divprune:keep=0", ["budget 0", "1..16"]),
    ("cdpruner:keep=17", ["budget 17", "1..16"]),
    ("mmtok:keep=17", ["budget 17", "1..16"]),
    ("vispruner:keep=4,ratio=1.5", ["ratio", "0..1"]),
    ("vispruner:keep=4,ratio=-0.1", ["ratio", "0..1"]),
    ("vispruner:keep=4,ratio=half", ["not a finite number"]),
    ("mmtok:keep=4,alpha=-1", ["alpha", "at least 0"]),
    ("mmtok:keep=4,tau=1", ["unknown parameter", "alpha"]),
    ("cdpruner:keep=4,merge=avg", ["merge must be one of", "none, mean, prop"]),
    ("divprune:keep=4,positions=packed", ["positions must be one of original, compact"]),
])
def test_bad_specs_are_one_line_user_errors(model, spec, words):  # noqa: F811
    with pytest.raises(fastllava.UserError) as err:
        model.generate(images=[_image(0)], prompts=["what ?"], max_new_tokens=1, reduce=spec)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_methods_lists_them_with_their_papers(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, arxiv in zip(NEW, ["2503.02175", "2412.01818", "2506.10967", "2508.18264"]):
        assert name in out and METHODS[name].paper in out and arxiv in METHODS[name].paper


# --- behaviour on crafted features (VisionContext built by hand; project is the identity) ---

def _ctx(features, budget, vision=None, cls=None, text=None):
    n, p, d = features.shape
    text = torch.zeros(n, 1, d) if text is None else text
    valid = text.abs().sum(-1) > 0
    return VisionContext(vision=features if vision is None else vision, features=features, cls_attention=cls,
                         keys=None, text=text, text_valid=valid, grid=4, budget=budget, project=lambda v: v)


def _kept(name, ctx, **params):
    return set(METHODS[name](keep=ctx.budget, **params).select(ctx).keep[0].nonzero().flatten().tolist())


def _clusters(seed=0, k=4, size=4, d=16, noise=0.02):
    """k tight clusters of `size` tokens, shuffled -> (features [1, k*size, d], cluster of each token)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, k, generator=g))[0].T  # k orthonormal directions
    label = torch.randperm(k * size, generator=g) % k
    return (centres[label] + noise * torch.randn(k * size, d, generator=g))[None], label


def _min_distance(x, kept):
    u = F.normalize(x[list(kept)], dim=-1)
    d = 1 - u @ u.T
    return float(d[~torch.eye(len(kept), dtype=torch.bool)].min())


def test_divprune_keeps_one_token_per_cluster_and_spreads_wider_than_random():
    x, label = _clusters()
    kept = _kept("divprune", _ctx(x, 4))
    assert sorted(label[list(kept)].tolist()) == [0, 1, 2, 3]
    feats = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = _min_distance(feats[0], _kept("divprune", _ctx(feats, 5)))
    g = torch.Generator().manual_seed(2)
    randoms = [_min_distance(feats[0], torch.randperm(16, generator=g)[:5].tolist()) for _ in range(50)]
    assert ours >= max(randoms)


def test_vispruner_keeps_the_most_attended_then_skips_duplicates():
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(8, 16, generator=g)
    x = distinct[torch.arange(16) // 2][None]  # tokens 2i and 2i+1 are copies
    cls = torch.linspace(1, 0.1, 16)[None]  # attention falls with the index: the top 8 are 4 pairs of copies
    kept = _kept("vispruner", _ctx(x, 8, cls=cls))
    assert {0, 1, 2, 3} <= kept  # the important half: the 4 most attended
    diverse = sorted(kept - {0, 1, 2, 3})
    assert len(diverse) == 4 and len({i // 2 for i in diverse}) == 4  # no two copies among the diverse
    assert _kept("vispruner", _ctx(x, 8, cls=cls), ratio=1.0) == set(range(8))  # all important: fastervlm


def test_cdpruner_follows_the_instruction():
    feats = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(4)))[0][None] + 0.1
    for target in (7, 3, 12):
        text = torch.stack([feats[0, target], feats[0, target] + 0.05])[None]  # an instruction about one token
        assert _kept("cdpruner", _ctx(feats, 1, text=text)) == {target}
    about_7 = _kept("cdpruner", _ctx(feats, 6, text=feats[:, [7]]))
    about_3 = _kept("cdpruner", _ctx(feats, 6, text=feats[:, [3]]))
    assert 7 in about_7 and 3 in about_3 and about_7 != about_3


def test_cdpruner_differs_by_prompt_on_the_model(model):  # noqa: F811
    kept = {}
    for prompt in ("what color is the circle ?", "the square is blue ?", "what color is the circle ?"):
        red = make_reduction("cdpruner:keep=4", model.config)
        model.logits(**model.inputs([_image(5)], [prompt]), reduce=red)
        kept.setdefault(prompt, []).append(red.owner[0].clone())
    assert torch.equal(*kept["what color is the circle ?"])
    assert not torch.equal(kept["what color is the circle ?"][0], kept["the square is blue ?"][0])


def test_mmtok_covers_the_text_then_the_image():
    x, label = _clusters(seed=5)
    a, b = [int((label == c).nonzero()[0]) for c in (0, 2)]  # a token of cluster 0, one of cluster 2
    assert _kept("mmtok", _ctx(x, 1, text=x[:, [a]]), alpha=0.0) == {a}  # the text's best match
    kept = _kept("mmtok", _ctx(x, 2, text=x[:, [a, b]]), alpha=0.0)  # two text tokens: both covered
    assert sorted(label[list(kept)].tolist()) == [0, 2]
    kept = _kept("mmtok", _ctx(x, 4))  # no text: cover the image, one token per cluster
    assert sorted(label[list(kept)].tolist()) == [0, 1, 2, 3]
    both = _kept("mmtok", _ctx(x, 4, text=x[:, [2]]))
    assert 2 in both and sorted(label[list(both)].tolist()) == [0, 1, 2, 3]


# --- LLaVA-NeXT: per-tile budgets (test_reduction_next.py also runs every method at keep=9 and full) ---

@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    path = save_checkpoint(tiny_llava(pinpoints=PINPOINTS, seed=11, kv_heads=2), tmp_path_factory.mktemp("r25"), "new")
    build_word_tokenizer(NEXT_WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return fastllava.load(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", NEW)
def test_next_batch_equals_each_image_alone_with_exact_budgets(next_model, name):
    sizes = [(40, 160), (160, 40), (50, 50), (300, 20)]
    prompts = ["describe it .", "what is in the picture ?", "what is it ?", "describe the picture ."]
    images = [_photo(h, w, 20 + i) for i, (h, w) in enumerate(sizes)]
    batched = next_model.generate(images=images, prompts=prompts, max_new_tokens=4, reduce=f"{name}:keep=20")
    for img, prompt, got in zip(images, prompts, batched):
        assert got.stats["visual_tokens"] == [20]
        alone = next_model.generate(images=[img], prompts=[prompt], max_new_tokens=4, reduce=f"{name}:keep=20")[0]
        assert got.token_ids == alone.token_ids, name


@pytest.mark.parametrize("name", NEW)
def test_next_budget_below_the_partitions_leaves_some_empty(next_model, name):
    image = _photo(64, 64, 4)  # 5 partitions: 3 of them get no token at keep=2
    for spec in (f"{name}:keep=2", f"{name}:keep=1"):
        out = next_model.generate(images=[image], prompts=["what is it ?"], max_new_tokens=1, reduce=spec)[0]
        assert out.stats["visual_tokens"] == [int(spec[-1])]


@pytest.mark.parametrize("name", NEW)
def test_next_shares_the_budget_by_tokens_per_tile(next_model, name):
    image = _photo(64, 64, 3)  # 2 x 2 tiles: the base 16 patches, four tiles of 16, 8 newlines
    inputs = next_model.inputs([image], ["what is it ?"])
    part = next_model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])["part"][0]
    red = make_reduction(f"{name}:keep=40", next_model.config)
    next_model.logits(**inputs, reduce=red)
    kept = red.owner[0] >= 0
    assert torch.bincount(part[kept & (part >= 0)], minlength=5).tolist() == [8] * 5 and not kept[part < 0].any()
