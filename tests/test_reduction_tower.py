"""Reduction inside the vision tower (flowcut, pitome, visiondrop) and the text-dominance paper's
compression (rebalance) on the tiny random models of test_reduction.py (16 patches, a 3-block CLIP
tower whose selected features come out of block 2): full budgets are exact, budgets hold per sample
in a padded batch, batches equal single prompts, bad parameters are one-line errors, towers and
models that cannot take them refuse in one line, and each method's defining behaviour."""

import pytest
import torch

import fastllava
from fastllava.cli import main
from fastllava.config import LlavaConfig
from fastllava.models.vision import Probe, Shrink, Tokens
from fastllava.reduction import METHODS, FlowCut, PiToMe, VisionDrop
from fastllava.reduction.base import TowerMethod
from fastllava.reduction.flowcut import adaptive_count, flow_scores
from fastllava.reduction.pitome import bipartite, cosines, counts, energy
from fastllava.reduction.runtime import make_reduction
from fastllava.reduction.visiondrop import received, received_causal
from hf_reference import tiny_onevision
from test_reduction import (P, _image, check_batch_equals_alone, check_budgets, check_full_budget,  # noqa: F401
                            model)  # the tiny LLaVA-1.5 checkpoint fixture
from test_reduction_2025 import _photo, next_model  # noqa: F401  (the tiny LLaVA-NeXT fixture)

TOWER = ["flowcut", "pitome", "visiondrop"]
FULL = {"flowcut": "flowcut:keep=16", "flowcut+every1": "flowcut:keep=16,every=1", "pitome": "pitome:keep=16",
        "visiondrop": "visiondrop:keep=16", "visiondrop+none": "visiondrop:keep=16,merge=none",
        "rebalance": "rebalance:keep=16", "pitome+all": "pitome:keep=16,prop=all",
        "visiondrop+llm": "visiondrop:keep=16,llm=1,llm_ratio=1"}
SMALL = {"flowcut": "flowcut:keep=5", "flowcut+every1": "flowcut:keep=3,every=1", "pitome": "pitome:keep=5",
         "pitome+all": "pitome:keep=6,prop=all", "pitome+last": "pitome:keep=8,blocks=1",
         "visiondrop": "visiondrop:keep=5", "visiondrop+none": "visiondrop:keep=4,merge=none",
         "visiondrop+one": "visiondrop:keep=6,layers=2", "rebalance": "rebalance:keep=5",
         "rebalance+prop": "rebalance:keep=5,merge=prop", "flowcut+compact": "flowcut:keep=5,positions=compact",
         "visiondrop+llm": "visiondrop:keep=8,llm=1-2", "visiondrop+llm-none": "visiondrop:keep=6,llm=2,merge=none"}


def test_registered_and_listed_with_their_papers(capsys):
    for name in TOWER:
        assert issubclass(METHODS[name], TowerMethod) and METHODS[name].images == "single"
    assert METHODS["flowcut"].reads_cls and not METHODS["pitome"].reads_cls and not METHODS["visiondrop"].reads_cls
    assert METHODS["rebalance"].where == "vision" and METHODS["rebalance"].images == "any"
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, arxiv in zip(TOWER + ["rebalance"], ["2505.19536", "2405.16148", "2506.22283", "2508.10552"]):
        assert name in out and METHODS[name].paper in out and arxiv in METHODS[name].paper
    assert out.count("in the ViT") == 3 and "llm=none" in out


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_budget_reproduces_unreduced_logits(model, name):  # noqa: F811
    check_full_budget(model, FULL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_budget_holds_for_every_sample(model, name):  # noqa: F811
    check_budgets(model, SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_of_four_equals_each_alone(model, name):  # noqa: F811
    check_batch_equals_alone(model, SMALL[name])


class UnevenPlan:
    """A plan keeping, after block 1, the first counts[i] patches of image i (rows then differ and are
    padded in block 2) and, after block 2, the first 3 of those."""

    def __init__(self, counts):
        self.counts = torch.tensor(counts)

    def wants(self, block):
        return ()

    def step(self, block, x, probe, tokens):
        place = torch.arange(tokens.alive.shape[1]).expand_as(tokens.alive)
        limit = self.counts[:, None] if block == 1 else 3
        return Shrink(torch.where(place <= limit, place, -1))


def test_rows_padded_in_the_tower_equal_each_image_alone(model):  # noqa: F811
    pixels = model.inputs([_image(20 + i) for i in range(3)], ["what ?"] * 3)["pixel_values"]
    m = model.model
    counts = [16, 5, 9]
    (batched,), tokens = m.vision_tower(pixels, m.cfg.vision_feature_layers, plan=UnevenPlan(counts))
    assert tokens.alive.all() and tokens.index.tolist() == [[0, 1, 2, 3]] * 3
    for i, c in enumerate(counts):
        (alone,), _ = m.vision_tower(pixels[i:i + 1], m.cfg.vision_feature_layers, plan=UnevenPlan([c]))
        assert (alone[0] - batched[i]).abs().max() <= 1e-5
    (every,), _ = m.vision_tower(pixels[1:2], m.cfg.vision_feature_layers, plan=UnevenPlan([16]))
    assert (every[0] - batched[1]).abs().max() > 1e-3  # the padded row did see only its 5 patches in block 2


@pytest.mark.parametrize("spec, words", [
    ("flowcut:keep=17", ["budget 17", "1..16"]),
    ("flowcut:keep=0", ["budget 0", "1..16"]),
    ("flowcut:keep=4,every=0", ["every", "at least 1"]),
    ("flowcut:keep=4,ratio=1", ["unknown parameter", "every"]),
    ("pitome:keep=3", ["at most halve 16 patches", "to 4", "raise keep or blocks"]),
    ("pitome:keep=7,blocks=1", ["at most halve 16 patches 1 times, to 8"]),
    ("pitome:keep=8,prop=llm", ["prop must be tower or all"]),
    ("pitome:keep=8,alpha=0", ["alpha must be more than 0"]),
    ("pitome:keep=8,blocks=-1", ["blocks", "at least 0"]),
    ("visiondrop:keep=8,merge=prop", ["merge must be mean or none"]),
    ("visiondrop:keep=8,layers=2-1", ["layers must be increasing"]),
    ("visiondrop:keep=8,layers=3", ["vision block 3 is after block 2"]),
    ("visiondrop:keep=8,layers=x", ["not"]),
    ("visiondrop:keep=8,llm=2-1", ["llm must be increasing decoder layers"]),
    ("visiondrop:keep=8,llm=3", ["layer 3 is outside 1..2"]),
    ("visiondrop:keep=8,llm=1,llm_ratio=0", ["llm_ratio must be in (0, 1]"]),
    ("rebalance:keep=4,merge=avg", ["merge must be one of", "none, mean, prop"]),
    ("flowcut:keep=4,positions=packed", ["positions must be one of original, compact"]),
])
def test_bad_specs_are_one_line_user_errors(model, spec, words):  # noqa: F811
    with pytest.raises(fastllava.UserError) as err:
        model.generate(images=[_image(0)], prompts=["what ?"], max_new_tokens=1, reduce=spec)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


@pytest.mark.parametrize("name", TOWER)
def test_llava_next_refuses_with_the_reason(next_model, name):  # noqa: F811
    with pytest.raises(fastllava.UserError) as err:
        next_model.generate(images=[_photo(40, 60, 1)], prompts=["what is it ?"], max_new_tokens=1,
                            reduce=f"{name}:keep=8")
    message = str(err.value)
    assert "\n" not in message and "encodes each LLaVA-NeXT tile on its own" in message


def test_rebalance_runs_per_tile_on_llava_next(next_model):  # noqa: F811
    images = [_photo(40, 160, 2), _photo(50, 50, 3)]
    out = next_model.generate(images=images, prompts=["describe it .", "what is it ?"], max_new_tokens=2,
                              reduce="rebalance:keep=20")
    assert [r.stats["visual_tokens"] for r in out] == [[20], [20]]


def test_a_tower_without_class_token_refuses_in_one_line():
    cfg = LlavaConfig.from_dict(tiny_onevision().config.to_dict())
    with pytest.raises(fastllava.UserError) as err:
        make_reduction("flowcut:keep=8", cfg)
    assert "class-token attention" in str(err.value) and "siglip" in str(err.value) and "\n" not in str(err.value)
    for name in ("pitome", "visiondrop"):
        with pytest.raises(fastllava.UserError) as err:
            make_reduction(f"{name}:keep=8", cfg)
        assert "inside the vision tower" in str(err.value) and "\n" not in str(err.value)


def test_rebalance_keeps_what_the_class_token_attends_to_most(model):  # noqa: F811
    inputs = model.inputs([_image(7)], ["what ?"])
    owners = []
    for spec in ("rebalance:keep=5", "fastervlm:keep=5"):
        red = make_reduction(spec, model.config)
        model.logits(**inputs, reduce=red)
        owners.append(red.owner[0].clone())
    assert torch.equal(*owners) and int((owners[0] >= 0).sum()) == 5


# --- the tower's mechanism and each method's rule, on crafted inputs ---

def test_tokens_apply_drops_merges_and_tracks_owners():
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(2, 1, 1)  # [2, 6, 1]: token i holds i
    tokens = Tokens.start(x, True)
    into = torch.tensor([[0, 1, 1, 3, -1, 3], [0, 2, 2, 2, 2, 2]])
    out = tokens.apply(Shrink(into, merge=True, prop=True), x)
    assert out.shape == (2, 3, 1) and tokens.alive.tolist() == [[True] * 3, [True, True, False]]
    assert out[0, :, 0].tolist() == [0, 1.5, 4] and out[1, :2, 0].tolist() == [0, 3]  # size-weighted means
    assert tokens.sizes.tolist() == [[1, 2, 2], [1, 5, 1]] and tokens.index.tolist()[0] == [0, 1, 3]
    assert tokens.owner.tolist() == [[0, 1, 1, 2, -1, 2], [0, 1, 1, 1, 1, 1]]
    mask = tokens.mask(torch.float32)  # [2, 1, 1, 3]: log sizes, padding -inf
    assert torch.allclose(mask[0, 0, 0], torch.tensor([1.0, 2.0, 2.0]).log())
    assert mask[1, 0, 0, 2] == float("-inf")
    again = tokens.apply(Shrink(torch.tensor([[0, 1, -1], [0, -1, 0]])), out)  # plain drop; class token stays
    assert again.shape == (2, 2, 1) and tokens.owner.tolist() == [[0, 1, 1, -1, -1, -1], [0, -1, -1, -1, -1, -1]]


def test_flowcut_prunes_more_where_attention_concentrates():
    n = 33
    patches = torch.ones(2, n, dtype=torch.bool)
    patches[:, 0] = False
    flat = torch.full((n,), 1.0 / (n - 1)).masked_fill(~patches[0], 0)
    peaked = torch.zeros(n)
    peaked[1:5] = 0.25
    attention = torch.stack([flat, peaked]).double()
    keep = adaptive_count(attention, patches, 8, 4)
    assert keep[0] == 32 and keep[1] < 32  # uniform attention (maximal entropy) prunes nothing
    assert adaptive_count(attention, patches, 8, 0).tolist() == [8, 8]  # the selected block: exactly keep
    v = torch.randn(2, 4, n, 8)
    cls = torch.softmax(torch.randn(2, 4, n), -1)
    score, a = flow_scores(Probe(cls=cls, values=v), patches)
    assert score[:, 0].abs().max() == 0 and torch.allclose(a.sum(1), torch.ones(2, dtype=a.dtype))
    big = v.clone()
    big[:, :, 7] *= 10  # a denser value vector, same attention: a higher score
    assert (flow_scores(Probe(cls=cls, values=big), patches)[0][:, 7] > score[:, 7]).all()


def test_pitome_protects_isolated_tokens():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=g)
    keys = torch.cat([torch.randn(1, 8, generator=g), centre + 0.05 * torch.randn(6, 8, generator=g),
                      -centre[None]])[None]  # [1, 8, 8]: token 0 the class token, 1-6 a cluster, 7 isolated
    live = torch.ones(1, 8, dtype=torch.bool)
    live[0, 0] = False
    cos = cosines(keys)
    e = energy(cos, live, margin=0.5, alpha=1.0)
    assert e[0, 7] < e[0, 1:7].min()
    into = bipartite(cos, e, live, torch.tensor([3]))
    merged = (into[0] != torch.arange(8)).nonzero().flatten().tolist()
    assert len(merged) == 3 and set(merged) <= set(range(1, 7)) and set(into[0, merged].tolist()) <= set(range(1, 7))
    assert counts(16, 4, 2) == [8, 4] and counts(576, 64, 23)[-1] == 64


def test_visiondrop_rates_by_patch_to_patch_attention_only():
    attention = torch.zeros(1, 4, 4)
    attention[0, 0, 3] = 1.0  # the class token looks at patch 3 alone
    attention[0, 1:, 2] = 1.0  # every patch looks at patch 2
    patches = torch.tensor([[False, True, True, True]])
    r = received(attention, patches)
    assert r[0].argmax() == 2 and r[0, 3] == 0 and r[0, 0] == 0


def test_pitome_groups_cover_every_patch_and_sizes_add_up(model):  # noqa: F811
    red = make_reduction("pitome:keep=5,prop=all", model.config)
    model.logits(**model.inputs([_image(9)], ["what ?"]), reduce=red)
    sel = red.selections[0]
    assert int(sel.keep.sum()) == 5 and bool((sel.groups >= 0).all())
    assert float(sel.sizes[sel.keep].sum()) == P and red.key_bias is not None
    drop = make_reduction("visiondrop:keep=5,merge=none", model.config)
    model.logits(**model.inputs([_image(9)], ["what ?"]), reduce=drop)
    assert int((drop.owner[0] >= 0).sum()) == 5 and drop.key_bias is None


def test_methods_are_typed_objects_too(model):  # noqa: F811
    out = model.generate(images=[_image(4)], prompts=["what ?"], max_new_tokens=1,
                         reduce=VisionDrop(keep=4, layers=[1, 2]))
    assert out[0].stats["visual_tokens"] == [4]
    assert PiToMe(keep=8).spec() == "pitome:keep=8,positions=original,blocks=0,alpha=1.0,prop=tower"


def test_plans_keep_the_best_rated_patches():
    n = 9  # the class token and 8 patches
    x = torch.randn(1, n, 4)
    tokens = Tokens.start(x, True)
    values = torch.ones(1, 2, n, 4)
    cls = torch.full((1, 2, n), 0.01)
    cls[0, :, [2, 5, 7]] = 1.0  # the class token attends to patches 2, 5, 7
    shrink = FlowCut(keep=3).plan(1, 8).step(1, x, Probe(cls=cls.softmax(-1), values=values), tokens)
    kept = (shrink.into[0] == torch.arange(n))
    assert kept[1:].nonzero().flatten().add(1).tolist() == [2, 5, 7]  # (the tower keeps the class token itself)
    attention = torch.zeros(1, n, n)
    attention[0, 1:, 4] = 1.0  # every patch looks at patch 4, then 6
    attention[0, 1:, 6] = 0.5
    keys = torch.randn(1, 2, n, 3)
    shrink = VisionDrop(keep=2, layers=[1]).plan(1, 8).step(1, x, Probe(keys=keys, attention=attention), tokens)
    assert (shrink.into[0] == torch.arange(n))[1:].nonzero().flatten().add(1).tolist() == [4, 6]
    assert shrink.merge and set(shrink.into[0, 1:].tolist()) == {4, 6}  # every other patch merges into one of them
    shrink = PiToMe(keep=4).plan(1, 8).step(1, x, Probe(keys=keys), tokens)
    assert int((shrink.into[0] == torch.arange(n))[1:].sum()) == 4 and shrink.merge and shrink.prop


def test_visiondrop_in_the_llm_counts_only_the_raters_that_can_see_a_token():
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, 1, 1] = 1.0  # token 1 attends to itself; tokens 2 and 3 split theirs between 1 and 3
    probs[0, 0, 2, 1] = probs[0, 0, 2, 2] = 0.5
    probs[0, 0, 3, 3] = 1.0
    visual = torch.tensor([[False, True, True, True]])
    r = received_causal(probs, visual)[0]
    assert torch.allclose(r, torch.tensor([0.0, 1.5 / 3, 0.5 / 2, 1.0]))  # token 3: one rater, all of it


def test_static_decode_mode_gives_the_same_tokens(model):  # noqa: F811
    static = fastllava.load(model.path, device="cpu", dtype="float32", decode="static")
    images = [_image(30), _image(31)]
    prompts = ["what color is the circle ?", "what is it ?"]
    for spec in ("pitome:keep=6", "visiondrop:keep=6,llm=1", "flowcut:keep=5"):
        eager = model.generate(images=images, prompts=prompts, max_new_tokens=4, reduce=spec)
        fixed = static.generate(images=images, prompts=prompts, max_new_tokens=4, reduce=spec)
        assert [r.token_ids for r in eager] == [r.token_ids for r in fixed], spec
