"""fastllava against transformers' LlavaForConditionalGeneration on tiny random models."""

import pytest
import torch

import fastllava
from hf_reference import batch_inputs, save_checkpoint, tiny_llava

CONFIGS = {
    # name: (tiny_llava kwargs, layout, shards)
    "llama-mha-l-2-default-untied": (dict(text="llama", kv_heads=4), "saved", 1),
    "llama-gqa-l-1-full-tied": (dict(text="llama", kv_heads=2, feature_layer=-1, strategy="full", tie=True),
                                "original", 1),
    "mistral-gqa-window-multilayer": (dict(text="mistral", kv_heads=1, feature_layer=[-3, -1], sliding_window=12),
                                      "new", 3),
    "llama-rope-linear-theta": (dict(text="llama", kv_heads=2, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}), "saved", 2),
    "llama-rope-dynamic": (dict(text="llama", kv_heads=4, max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "new", 1),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs, layout, shards = CONFIGS[request.param]
    hf = tiny_llava(**kwargs)
    path = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout, shards)
    ours = fastllava.load(path, device="cpu", dtype="float32")
    return request.param, hf, ours


def _features(hf) -> int:
    return 17 if hf.config.vision_feature_select_strategy == "full" else 16


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pixels = batch_inputs(_features(hf))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    got = ours.logits(ids, pixels, attention_mask=mask)
    real = mask.bool()
    assert got.shape == ref.shape
    diff = (got[real] - ref[real]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    assert ref[real].std() > 1e-2  # the comparison is not between two constants


# Dynamic NTK scaling depends on the longest sequence in the call, so a padded row need not
# equal the row alone there (transformers behaves the same way).
@pytest.mark.parametrize("pair", [n for n in sorted(CONFIGS) if "dynamic" not in n], indirect=True)
def test_positions_count_real_tokens(pair):
    """With position_ids from the mask, a padded row gives the logits it gives alone."""
    name, hf, ours = pair
    ids, mask, pixels = batch_inputs(_features(hf))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = ours.logits(ids, pixels, attention_mask=mask, position_ids=pos)
    row = 1
    n = int(mask[row].sum())
    alone = ours.logits(ids[row:row + 1, -n:], pixels[row:row + 1])
    assert (batched[row, -n:] - alone[0]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pixels = batch_inputs(_features(hf), seed=2)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=20,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate_ids(ids, pixels, attention_mask=mask, max_new_tokens=20, eos_token_id=None)
    assert got.shape == (2, 20)
    assert torch.equal(got, ref), f"{name}:\n{got}\n{ref}"


def test_every_layout_loads_the_same_weights(tmp_path):
    hf = tiny_llava(text="llama", kv_heads=2, tie=False, seed=3)
    ids, mask, pixels = batch_inputs(16)
    outs = []
    for layout in ("saved", "new", "original"):
        for shards in (1, 3):
            path = save_checkpoint(hf, tmp_path / f"{layout}-{shards}", layout, shards)
            outs.append(fastllava.load(path, device="cpu").logits(ids, pixels, attention_mask=mask))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_sampling_is_seeded(pair):
    name, hf, ours = pair
    ids, mask, pixels = batch_inputs(_features(hf))
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None, temperature=1.5, top_p=0.9, top_k=20)
    a = ours.generate_ids(ids, pixels, seed=7, **kw)
    b = ours.generate_ids(ids, pixels, seed=7, **kw)
    c = ours.generate_ids(ids, pixels, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bfloat16_runs_close_to_float32(tmp_path):
    hf = tiny_llava(seed=4)
    path = save_checkpoint(hf, tmp_path / "m")
    ids, mask, pixels = batch_inputs(16)
    f32 = fastllava.load(path, device="cpu", dtype="float32").logits(ids, pixels, attention_mask=mask)
    bf16 = fastllava.load(path, device="cpu", dtype="bfloat16")
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    got = bf16.logits(ids, pixels, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - f32[real]).abs().max().item() < 0.1
