"""Visual token reduction on a tiny random model (16 visual tokens, 3 decoder layers): full budgets
are exact, budgets hold per sample, batches equal single prompts, the KV cache equals
recomputation under the same selection, and pruned tokens leave the later layers' cache."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation.prefill import prepare
from fastllava.ops import attention_mask, positions_from_mask
from fastllava.reduction import METHODS, Reduction, parse_spec
from fastllava.reduction.runtime import make_reduction
from hf_reference import IMAGE_TOKEN, VOCAB, batch_inputs, save_checkpoint, tiny_llava

P = 16  # visual tokens per image of the tiny model
FULL = {  # a spec keeping every visual token, per method
    "divprune": "divprune:keep=16", "vispruner": "vispruner:keep=16", "cdpruner": "cdpruner:keep=16",
    "mmtok": "mmtok:keep=16",
    "random": "random:keep=16,seed=3", "pool": "pool:keep=16", "fastervlm": "fastervlm:keep=16",
    "visionzip": "visionzip:keep=16", "fastv": "fastv:keep=16", "pdrop": "pdrop:keep=16,ratio=1",
    "sparsevlm": "sparsevlm:keep=16", "dart": "dart:keep=16,pivots=3",
    "fastv+prop": "fastv:keep=16,merge=prop", "dart+mean": "dart:keep=16,pivots=3,merge=mean",
    "fastervlm+prop": "fastervlm:keep=16,merge=prop", "random+mean": "random:keep=16,merge=mean",
    "visionzip+compact": "visionzip:keep=16,positions=compact",
    "flowcut": "flowcut:keep=16", "pitome": "pitome:keep=16", "visiondrop": "visiondrop:keep=16",
    "rebalance": "rebalance:keep=16",
}
SMALL = {  # a real reduction, per method
    "divprune": "divprune:keep=5", "vispruner": "vispruner:keep=6", "cdpruner": "cdpruner:keep=5",
    "mmtok": "mmtok:keep=5",
    "random": "random:keep=5", "pool": "pool:keep=6", "fastervlm": "fastervlm:keep=5",
    "visionzip": "visionzip:keep=6,contextual=2", "fastv": "fastv:keep=5,layer=1",
    "pdrop": "pdrop:keep=8,layers=1-2", "sparsevlm": "sparsevlm:keep=6,recycle=2",
    "dart": "dart:keep=5,pivots=2",
    "fastv+prop": "fastv:keep=5,layer=1,merge=prop", "dart+mean": "dart:keep=5,pivots=2,merge=mean",
    "dart+prop": "dart:keep=6,pivots=-1,merge=prop", "pdrop+prop": "pdrop:keep=8,layers=1-2,merge=prop",
    "fastervlm+prop": "fastervlm:keep=5,merge=prop", "random+mean": "random:keep=6,merge=mean",
    "visionzip+prop": "visionzip:keep=6,contextual=2,merge=prop",
    "fastervlm+compact": "fastervlm:keep=5,positions=compact", "pool+compact": "pool:keep=6,positions=compact",
    "flowcut": "flowcut:keep=5", "pitome": "pitome:keep=6", "visiondrop": "visiondrop:keep=5",
    "rebalance": "rebalance:keep=5",
}
WORDS = ["user", "assistant", ":", "?", ".", "what", "color", "is", "the", "circle", "square", "red", "blue"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]


def test_every_spec_reads_back_to_its_method():  # sweeps and results pass methods on as spec strings
    for cls in METHODS.values():
        method = cls()
        assert parse_spec(method.spec()) == method, method.spec()
        assert parse_spec(method.label()) == method


def test_every_method_is_covered():  # the LLaVA-NeXT-only methods: test_reduction_next.py
    names = sorted(n for n, m in METHODS.items() if m.images != "tiled")
    assert sorted({k.split("+")[0] for k in FULL}) == sorted({k.split("+")[0] for k in SMALL}) == names


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(tiny_llava(kv_heads=2, seed=5), tmp_path_factory.mktemp("red"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return fastllava.load(path, device="cpu", dtype="float32")


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def check_full_budget(model, spec: str) -> None:
    """A spec keeping every visual token gives the unreduced logits (a padded batch)."""
    ids, mask, pixels = batch_inputs(P)
    positions = positions_from_mask(mask)
    ref = model.logits(ids, pixels, mask, positions)
    got = model.logits(ids, pixels, mask, positions, reduce=spec)
    real = mask.bool()
    assert got.shape == ref.shape
    assert (got[real] - ref[real]).abs().max() <= 1e-5


def check_budgets(model, spec: str) -> tuple[list, object]:
    """Every sample of a padded batch (one without an image) keeps exactly the spec's budgets:
    the visual tokens entering the LLM (all P for a method inside it), then after each cut."""
    prompts = ["what color is the circle ?", "what is the square ?", "red ?", "what color ?"]
    images = [_image(1), _image(2), None, _image(3)]
    out = model.generate(images=images, prompts=prompts, max_new_tokens=2, reduce=spec)
    method = make_reduction(spec, model.config).method
    want = ([P] if method.where == "llm" else []) + method.budgets()
    for img, r in zip(images, out):
        assert r.stats["visual_tokens"] == (want if img is not None else [0] * len(want))
    return out, method


def check_batch_equals_alone(model, spec: str) -> None:
    """A batch of four gives each prompt the tokens it gets alone."""
    images = [_image(10 + i) for i in range(4)]
    prompts = ["what color is the circle ?", "what is it ?", "the square is what color ?", "blue ?"]
    batched = model.generate(images=images, prompts=prompts, max_new_tokens=6, reduce=spec)
    for img, prompt, got in zip(images, prompts, batched):
        alone = model.generate(images=[img], prompts=[prompt], max_new_tokens=6, reduce=spec)[0]
        assert got.token_ids == alone.token_ids


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_budget_reproduces_unreduced_logits(model, name):
    check_full_budget(model, FULL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_budget_holds_for_every_sample(model, name):
    out, method = check_budgets(model, SMALL[name])
    assert all(r.stats["reduce"] == method.spec() for r in out)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_of_four_equals_each_alone(model, name):
    check_batch_equals_alone(model, SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cached_greedy_equals_recompute_under_same_selection(model, name):
    ids, mask, pixels = batch_inputs(P, seed=4)
    n = 6
    run = make_reduction(SMALL[name], model.config)
    new = model.generate_ids(ids, pixels, mask, max_new_tokens=n, eos_token_id=None, reduce=run)
    full_ids = torch.cat([ids, new[:, :-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new[:, :-1])], dim=1)
    replay = Reduction(run.method, P, replay=run.selections)
    logits = model.logits(full_ids, pixels, full_mask, positions_from_mask(full_mask), reduce=replay)
    assert torch.equal(logits[:, -n:].argmax(-1), new)
    assert [c.tolist() for c in replay.counts] == [c.tolist() for c in run.counts]


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "fastv+prop", "pdrop+prop"])
def test_pruned_tokens_leave_later_layers_cache(model, name):
    ids, mask, pixels = batch_inputs(P)
    red = make_reduction(SMALL[name], model.config)
    with torch.no_grad():
        _, _, cache = model.runner.prefill(ids, mask, pixels, 4, red)
    real = mask.sum(1)  # [B] real prompt tokens per row
    for layer in range(3):
        visual = red.counts[sum(1 for c in red.cuts if c < layer)]  # [B] visual tokens this layer sees
        held = cache.valid[layer].sum(1)  # real tokens per row in this layer's cache
        assert held.tolist() == (real - P + visual).tolist()
        assert cache.lengths[layer] == int((real - P + visual).max())  # the widest row sets the length


def test_stats_count_flops_and_equivalent_tokens(model):
    out = model.generate(images=[_image(1)], prompts=["what ?"], max_new_tokens=1, reduce="fastv:keep=4,layer=1")[0]
    s = out.stats
    assert s["visual_tokens"] == [16, 4]
    assert s["visual_tokens_equivalent"] == round((16 + 4 + 4) / 3, 2)
    d, m, text = 64, 112, s["prompt_tokens"]
    flops = sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in (text + 16, text + 4, text + 4))
    assert s["prefill_flops"] == flops
    plain = model.generate(images=[_image(1)], prompts=["what ?"], max_new_tokens=1)[0].stats
    assert plain["visual_tokens"] == [16] and plain["prefill_flops"] > flops


@pytest.mark.parametrize("spec, words", [
    ("nosuch", ["unknown reduction method", "fastv", "visionzip"]),
    ("fastv:kep=3", ["unknown parameter", "keep", "layer"]),
    ("fastv:keep=0", ["budget 0", "1..16"]),
    ("visionzip:keep=17", ["budget 17", "1..16"]),
    ("pdrop:keep=8,ratio=0.5,layers=1-3", ["layer 3", "1..2"]),
    ("fastv:keep=many", ["not an integer"]),
    ("fastv:keep", ["needs a value"]),
    ("pool:keep=7", ["1x7", "4x4"]),
    ("visionzip:keep=4,contextual=4", ["contextual"]),
    ("fastv:keep=4,merge=avg", ["merge must be one of", "none, mean, prop"]),
    ("dart:keep=4,merge=yes", ["merge must be one of"]),
    ("visionzip:keep=4,merge=none", ["merge must be one of mean, prop"]),
    ("dart:keep=4,pivots=0", ["pivots must be at least 1", "-1"]),
    ("fastervlm:keep=4,positions=packed", ["positions must be one of original, compact"]),
    ("fastv:keep=4,positions=compact", ["unknown parameter", "positions"]),
])
def test_bad_specs_are_one_line_user_errors(model, spec, words):
    with pytest.raises(fastllava.UserError) as err:
        model.generate(images=[_image(0)], prompts=["what ?"], max_new_tokens=1, reduce=spec)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize("spec", ["fastervlm:keep=17", "visionzip:keep=17", "fastv:keep=17", "sparsevlm:keep=17"])
def test_full_budget_with_class_token_feature_and_one_kv_head(tmp_path, spec):
    hf = tiny_llava(kv_heads=1, strategy="full", feature_layer=[-3, -1], seed=7)
    ours = fastllava.load(save_checkpoint(hf, tmp_path / "full", "new"), device="cpu", dtype="float32")
    ids, mask, pixels = batch_inputs(P + 1)
    positions = positions_from_mask(mask)
    ref = ours.logits(ids, pixels, mask, positions)
    got = ours.logits(ids, pixels, mask, positions, reduce=spec)
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5
    fewer = ours.logits(ids, pixels, mask, positions, reduce=spec.replace("17", "6"))
    assert fewer.shape[1] == ids.shape[1] - (P + 1 - 6)


def test_proportional_attention_equals_duplicated_keys(model):
    """A key whose logit gets log(3) draws the attention of three copies of it (ToMe's proportional
    attention), through SDPA and through the explicit probabilities of a cut layer."""
    lm = model.model.language_model
    attn = lm.layers[0].self_attn
    x = torch.randn(1, 3, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))  # [1, 3, D]
    copies = x[:, [0, 1, 1, 1, 2]]  # token 1 three times, at the same position
    cos, sin = lm.rotary(torch.tensor([[0, 1, 1, 1, 2]]), x.dtype)
    ref = attn(copies, cos, sin, attention_mask(None, 0, 5, 5, device=x.device), None, 0, 0, 5)[0][:, -1]
    cos, sin = lm.rotary(torch.tensor([[0, 1, 2]]), x.dtype)
    plain = attention_mask(None, 0, 3, 3, device=x.device)
    biased = attention_mask(None, 0, 3, 3, bias=torch.tensor([[0.0, math.log(3), 0.0]]), dtype=x.dtype)
    for read in (None, "all"):
        assert (attn(x, cos, sin, biased, None, 0, 0, 3, read)[0][:, -1] - ref).abs().max() <= 1e-5
    assert (attn(x, cos, sin, plain, None, 0, 0, 3)[0][:, -1] - ref).abs().max() > 1e-3


def test_merging_accounts_for_every_dropped_token(model):
    """With merge=prop every visual token joins a kept one: the group sizes of a row add up to its
    visual tokens, the later layers' key bias is their log (0 for text), and no token is dropped."""
    ids, mask, pixels = batch_inputs(P)
    positions = positions_from_mask(mask)
    red = make_reduction("fastv:keep=5,layer=1,merge=prop", model.config)
    model.logits(ids, pixels, mask, positions, reduce=red)
    sel = red.selections[0]
    assert torch.where(sel.keep, sel.sizes, 0).sum(1).tolist() == [float(P)] * 2
    assert torch.equal(red.key_bias[red.visual], sel.sizes[sel.keep].log())
    assert not red.key_bias[~red.visual].any()
    assert bool((red.owner >= 0).all())
    assert [len(set(row.tolist())) for row in red.owner] == [5, 5]  # every token owned by one of the 5 kept
    out = {m: model.logits(ids, pixels, mask, positions, reduce=f"fastv:keep=5,layer=1,merge={m}")
           for m in ("none", "mean", "prop")}
    real = torch.ones(out["none"].shape[:2], dtype=torch.bool)
    for a, b in (("none", "mean"), ("mean", "prop")):
        assert (out[a][real] - out[b][real]).abs().max() > 1e-4  # merging, then the bias, change the answer


def test_dart_half_pivots_equals_explicit(model):
    """dart:pivots=-1 is pivots = keep / 2."""
    ids, mask, pixels = batch_inputs(P)
    positions = positions_from_mask(mask)
    half = model.logits(ids, pixels, mask, positions, reduce="dart:keep=6,pivots=-1,merge=prop")
    assert torch.equal(half, model.logits(ids, pixels, mask, positions, reduce="dart:keep=6,pivots=3,merge=prop"))
    assert not torch.equal(half, model.logits(ids, pixels, mask, positions, reduce="dart:keep=6,pivots=1,merge=prop"))


def test_compact_positions_number_the_shortened_prompt(model):
    """positions=compact (before the LLM): the kept sequence is numbered 0, 1, ... per row (left
    padding at 0), and the answer differs from keeping the original positions."""
    ids, mask, pixels = batch_inputs(P)
    outs = {}
    for pos in ("original", "compact"):
        red = make_reduction(f"fastervlm:keep=5,positions={pos}", model.config)
        x, positions, valid = prepare(model.model, ids, pixels, mask.bool(), positions_from_mask(mask), red)
        outs[pos] = positions
        if pos == "compact":
            assert torch.equal(positions, positions_from_mask(valid.long()))
    assert int(outs["original"].max()) == int(positions_from_mask(mask).max())  # gaps where tokens went
    assert int(outs["compact"].max()) == int(valid.sum(1).max()) - 1
    logits = {p: model.logits(ids, pixels, mask, positions_from_mask(mask), reduce=f"fastervlm:keep=5,positions={p}")
              for p in ("original", "compact")}
    assert (logits["original"] - logits["compact"]).abs().max() > 1e-4


@pytest.mark.parametrize("spec", ["pdrop:keep=8,layers=1-2", "fastv:keep=5,layer=1,rater=last"])
def test_last_query_attention_equals_the_full_attention_row(model, spec):
    """PyramidDrop and FastV's rater=last read only the last query's attention, computed beside
    fused attention: they keep the tokens, and give the logits, that the explicit attention of
    every query gives (two rows of different lengths: left padding under the masks)."""
    ids, mask, pixels = batch_inputs(P)
    positions = positions_from_mask(mask)
    last, full = make_reduction(spec, model.config), make_reduction(spec, model.config)
    assert last.attention == "last"
    full.attention = "all"  # every query's probabilities, explicitly
    got = model.logits(ids, pixels, mask, positions, reduce=last)
    ref = model.logits(ids, pixels, mask, positions, reduce=full)
    assert torch.equal(last.owner, full.owner) and (last.owner < 0).any()
    assert (got - ref).abs().max() <= 1e-5
