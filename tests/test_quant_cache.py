"""The quantized KV cache: the memory it allocates and the StaticKVCache interface it keeps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastllava
from fastllava import UserError
from fastllava.cli import main
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.kvcache import StaticKVCache
from fastllava.quant.kvcache import new_kv_cache
from fastllava.reduction.runtime import make_reduction
from hf_reference import IMAGE_TOKEN, VOCAB, batch_inputs, save_checkpoint, tiny_llava
from test_engine import WORDS
from test_quant_kv import _keys, _ones


def _cache_bytes(spec, max_len=4096, head_dim=128):
    return new_kv_cache(spec, 2, 1, 4, max_len, head_dim, torch.float16, "cpu").nbytes


def test_cache_memory_shrinks():
    fp = _cache_bytes("fp")
    assert fp == 2 * 2 * 1 * 4 * 4096 * 128 * 2
    ratios = {s: _cache_bytes(s) / fp for s in ("kivi:bits=4", "kivi:bits=2", "vidkv")}
    # per element: bits + fp16 scale and min per group of 32 (1 bit), plus a 128 + 32 token residual
    assert 0.3 < ratios["kivi:bits=4"] < 0.36
    assert 0.17 < ratios["kivi:bits=2"] < 0.23
    assert ratios["vidkv"] < 0.2


def test_quantized_cache_interface_matches_static():
    static = StaticKVCache(2, 2, 3, 100, 32, torch.float32, "cpu")
    quant = new_kv_cache("kivi:bits=4,group=16,residual=32", 2, 2, 3, 100, 32, torch.float32, "cpu")
    x = _keys(n=40)
    valid = _ones(2, 40)
    valid[0, :5] = False
    for cache in (static, quant):
        start, end = cache.reserve(0, valid)
        assert (start, end) == (0, 40)
        k, v = cache.update(0, start, x, -x, end)
        assert k.shape == v.shape == (2, 3, 40, 32)
        assert torch.equal(k, x)  # the writing step reads its own tokens as given
    sk, _ = static.update(1, 0, x, x, 40)
    qk, _ = quant.update(1, 0, x, x, 40)
    step = _keys(n=1, seed=3)
    for cache in (static, quant):
        cache.reserve(0, _ones(2, 1))
    sk, sv = static.update(0, 40, step, step, 64)  # a span past the slots written: zeros there, masked
    qk, qv = quant.update(0, 40, step, step, 64)
    assert qk.shape == sk.shape == (2, 3, 64, 32) and float((qk - sk)[1].norm() / sk[1].norm()) < 0.1
    assert not bool(qk[:, :, 41:].any()) and not bool(static.valid[0, :, 41:].any())


def test_update_at_a_tensor_slot_returns_what_an_int_slot_does():
    """The fixed-shape step writes at a slot held in a tensor; the result is the same as at an int."""
    caches = [StaticKVCache(1, 2, 3, 16, 8, torch.float32, "cpu") for _ in range(2)]
    x, step = _keys(n=5, d=8), _keys(n=1, d=8, seed=3)
    got = []
    for cache, slot in zip(caches, (5, torch.tensor([5]))):
        cache.reserve(0, _ones(2, 5))
        cache.update(0, 0, x, x, 5)
        cache.reserve(0, _ones(2, 1))
        got.append(cache.update(0, slot, step, -step, 8))
    for (k1, v1), (k2, v2) in [got]:
        assert k1.shape == k2.shape == (2, 3, 8, 8) and torch.equal(k1, k2) and torch.equal(v1, v2)


# ---- the quantized cache inside the model ----


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_checkpoint(tiny_llava(seed=5), tmp_path_factory.mktemp("kvq"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    return path


def _forced_decode_logits(llava, ids, mask, pixels, tokens, reduce=None):
    """Prefill (with a token reduction if asked), then feed `tokens` [B, N] one by one, as
    generation does: logits [B, 1 + N, V] of every step, and the cache."""
    reduction = make_reduction(reduce, llava.config)
    with torch.inference_mode():
        first, positions, cache = llava.runner.prefill(ids, mask, pixels, tokens.shape[1], reduction)
        step = llava.runner.step(cache)
        out, pos = [first], positions[:, -1:]
        for i in range(tokens.shape[1]):
            pos = pos + 1
            out.append(step(tokens[:, i], pos))
    return torch.stack(out, 1).float(), cache


def _decode_error(ref, got):
    """RMS error of the decode steps' logits relative to their spread."""
    ref, got = ref[:, 1:], got[:, 1:]
    return float((got - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())


# RMS logit error relative to the fp logits' spread, decode steps only, on the tiny random model
# (head size 16; group 8 and residual 16 so that most of the 28-token prompt is quantized).
# Measured: kivi 4-bit 0.008, kivi 2-bit 0.043, vidkv 0.11.
DECODE_TOLERANCE = {"kivi:bits=4,group=8,residual=16": 0.02, "kivi:bits=2,group=8,residual=16": 0.1,
                    "vidkv:group=8,residual=16": 0.25}


@pytest.mark.parametrize("spec", sorted(DECODE_TOLERANCE))
def test_decode_logits_close_to_fp(ckpt, spec):
    ids, mask, pixels = batch_inputs(16)  # two left-padded rows
    fp = fastllava.load(ckpt, device="cpu")
    tokens = fp.generate_ids(ids, pixels, mask, max_new_tokens=24, eos_token_id=None)
    ref, fp_cache = _forced_decode_logits(fp, ids, mask, pixels, tokens)
    got, cache = _forced_decode_logits(fastllava.load(ckpt, device="cpu", kv_cache=spec), ids, mask, pixels, tokens)
    assert torch.allclose(got[:, 0], ref[:, 0], atol=1e-5)  # the prefill attends in full precision
    assert 0 < _decode_error(ref, got) < DECODE_TOLERANCE[spec]
    assert cache.nbytes < fp_cache.nbytes


def test_generate_reports_kv_bytes(ckpt):
    ids, mask, pixels = batch_inputs(16)
    fp = fastllava.load(ckpt, device="cpu")
    q = fastllava.load(ckpt, device="cpu", kv_cache="kivi:bits=2,group=8,residual=16")
    a, b = (m.generate_ids(ids, pixels, mask, max_new_tokens=6) for m in (fp, q))
    assert a.shape == b.shape == (2, 6)


def test_bad_kv_cache_fails_before_loading(tmp_path):
    with pytest.raises(UserError, match="unknown kv_cache"):
        fastllava.load(tmp_path / "missing", kv_cache="kivi8")


def test_cli_run_with_quantization(ckpt, capsys):
    args = ["run", "--model", str(ckpt), "--prompt", "describe it .", "--max-new-tokens", "40", "--json"]
    assert main(args + ["--kv-cache", "kivi:bits=2,group=4,residual=4", "--weights", "int8"]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    fp = json.loads(capsys.readouterr().out)
    assert 0 < quant["stats"]["kv_cache_bytes"] < fp["stats"]["kv_cache_bytes"]
    assert main(args + ["--kv-cache", "kivi:bits=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bits must be 2 or 4" in err


@pytest.mark.parametrize("reduce", ["fastv:keep=4,layer=1", "pdrop:keep=8", "visionzip:keep=8,contextual=2",
                                    "fastv:keep=4,layer=1,merge=prop"])
def test_composes_with_token_reduction(ckpt, reduce):
    """Reduction inside the LLM leaves later layers with fewer slots (cache stages); each layer's
    quantized sequence follows its own length, and decode stays as close to fp as without reduction."""
    ids, mask, pixels = batch_inputs(16)
    fp = fastllava.load(ckpt, device="cpu")
    spec = "kivi:bits=4,group=4,residual=4"
    tokens = fp.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None, reduce=reduce)
    ref, fp_cache = _forced_decode_logits(fp, ids, mask, pixels, tokens, reduce)
    got, cache = _forced_decode_logits(fastllava.load(ckpt, device="cpu", kv_cache=spec), ids, mask, pixels,
                                       tokens, reduce)
    assert cache.lengths == fp_cache.lengths
    if not reduce.startswith("visionzip"):
        assert cache.lengths[-1] < cache.lengths[0]  # a compact stage after the cut
    assert 0 < _decode_error(ref, got) < 0.03


def test_bench_takes_quantization(tmp_path, capsys):
    def run(*extra):
        out = tmp_path / "-".join(extra or ("fp",)).replace(":", "_")
        assert main(["bench", "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                     "--new-tokens", "3", "--out", str(out), *extra]) == 0
        return json.loads((out / "bench.json").read_text())
    fp = run()
    q = run("--kv-cache", "kivi:bits=2", "--weights", "int4:group=32")
    assert q["settings"]["kv_cache"] == "kivi:bits=2,group=32,residual=128"
    assert q["settings"]["weights"] == "int4:group=32" and fp["settings"]["weights"] == "fp"
    assert q["cases"][0]["ours"]["kv_cache_bytes"] < 0.5 * fp["cases"][0]["ours"]["kv_cache_bytes"]
    capsys.readouterr()
    assert main(["bench", "--preset", "tiny", "--weights", "int8", "--compare", "hf", "--out", str(tmp_path)]) == 2
    assert "leave out --weights" in capsys.readouterr().err


def test_embedded_model_kivi4_decode_close_to_fp():
    """4-bit KIVI decode logits against fp on the embedded model, teacher-forced, two prompts
    (left-padded) on an example image: RMS error relative to the logits' spread. Measured on the
    v5 model: 0.074 (2-bit: 0.46, vidkv: 0.57; on v0: 0.030, 0.13, 0.12 — the trained model's
    sharper attention reads quantization error more); re-measure after retraining. On long
    answers 4-bit KIVI costs v5 one point of exact match (docs/quantization.md)."""
    fp = fastllava.load(device="cpu")
    image = Path(__file__).parent.parent / "examples" / "shapes_2.png"
    prompts = ["What color is the circle nearest to the blue square? Answer with one word.", "How many shapes are there?"]
    ids, mask, pixels = fp.encode([image, image], prompts)
    tokens = fp.generate_ids(ids, pixels, mask, max_new_tokens=8, eos_token_id=None)
    ref, fp_cache = _forced_decode_logits(fp, ids, mask, pixels, tokens)
    got, cache = _forced_decode_logits(fastllava.load(device="cpu", kv_cache="kivi:bits=4"), ids, mask, pixels, tokens)
    assert 0 < _decode_error(ref, got) < 0.1
    assert cache.nbytes < 0.45 * fp_cache.nbytes


def test_vidkv_salient_values_keep_two_bits():
    """Salient slots read their 2-bit values instead of ternary ones once quantized; the rest is
    unchanged, and the side store is counted in nbytes."""
    b, h, t, d = 2, 2, 64, 16
    v = _keys(b=b, h=h, n=t, d=d)
    embeds = torch.randn(b, t, 8)
    visual = torch.zeros(b, t, dtype=torch.bool)
    visual[:, 4:40] = True
    valid = _ones(b, t)
    plain, salient = (new_kv_cache(f"vidkv:group=8,residual=8,salient={r}", 1, b, h, 80, d, torch.float32, "cpu")
                      for r in (0, 0.25))
    for cache in (plain, salient):
        cache.prompt(embeds, visual, valid)
        cache.reserve(0, valid)
        cache.update(0, 0, v, v, t)
        cache.reserve(0, _ones(b, 1))
    _, got_plain = plain.update(0, t, v[:, :, :1], v[:, :, :1], t + 1)
    _, got = salient.update(0, t, v[:, :, :1], v[:, :, :1], t + 1)
    slots = salient.salient[0].slots  # [B, 9]: round(0.25 * 36)
    assert slots.shape == (2, 9) and bool(((slots >= 4) & (slots < 40)).all())
    mask = torch.zeros(b, t + 1, dtype=torch.bool)
    mask.scatter_(1, slots, True)
    err = lambda x: (x[:, :, :t] - v).abs().mean(-1)  # noqa: E731  [B, H, T]
    m = mask[:, None, :t].expand(b, h, t)
    assert float(err(got)[m].mean()) < 0.5 * float(err(got_plain)[m].mean())  # 2 bits beat ternary
    assert torch.equal(got[~mask[:, None, :].expand(b, h, t + 1)], got_plain[~mask[:, None, :].expand(b, h, t + 1)])
    assert salient.nbytes > plain.nbytes


def test_vidkv_salient_in_generation(ckpt):
    """generate tells the cache its prompt: salient values are allocated (and counted) and bring
    decode closer to fp than ternary values alone."""
    ids, mask, pixels = batch_inputs(16)
    fp = fastllava.load(ckpt, device="cpu")
    tokens = fp.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None)
    ref, _ = _forced_decode_logits(fp, ids, mask, pixels, tokens)
    errors, sizes = [], []
    for salient in (0, 1):
        q = fastllava.load(ckpt, device="cpu", kv_cache=f"vidkv:group=4,residual=4,salient={salient}")
        got, _ = _forced_decode_logits(q, ids, mask, pixels, tokens)
        errors.append(_decode_error(ref, got))
        image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        sizes.append(q.generate(images=[image], prompts=["describe it ."], max_new_tokens=2)[0].stats["kv_cache_bytes"])
        # after an in-LLM cut only the first stage's layers use salient values
        assert q.generate_ids(ids, pixels, mask, max_new_tokens=4, reduce="fastv:keep=8,layer=1").shape[0] == 2
    assert errors[1] < errors[0] and sizes[1] > sizes[0]


def _inserted_decode(llava, ids, mask, pixels, tokens, max_len=80):
    """As the server does: prefill each prompt alone in a small cache, insert its row into a shared
    cache (right-aligned), then decode all rows together on `tokens` [B, N]: logits [B, 1 + N, V]."""
    runner = llava.runner
    shared = runner.new_cache(ids.shape[0], max_len)
    first, last_pos = [], []
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            logits, positions, small = runner.prefill(ids[i:i + 1, keep], torch.ones(1, int(keep.sum())),
                                                      pixels[i:i + 1], 0)
            first.append(logits)
            last_pos.append(positions[:, -1:])
            shared.insert_row(i, small, 0, reset=i == 0)
        out, pos = [torch.cat(first)], torch.cat(last_pos)
        step = runner.step(shared)
        for j in range(tokens.shape[1]):
            pos = pos + 1
            out.append(step(tokens[:, j], pos))
    return torch.stack(out, 1).float()


@pytest.mark.parametrize("spec,tolerance", [("kivi:bits=4,group=4,residual=4", 0.02), ("vidkv:group=4,residual=4", 0.3)])
def test_rows_inserted_into_a_shared_cache(ckpt, spec, tolerance):
    """insert_row (the server's continuous batching) re-encodes a row at its new slots: decoding
    the shared batch stays as close to fp as a batch prefilled together (measured: kivi 4-bit
    0.007, vidkv 0.16)."""
    ids, mask, pixels = batch_inputs(16)
    fp = fastllava.load(ckpt, device="cpu")
    tokens = fp.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None)
    ref = _inserted_decode(fp, ids, mask, pixels, tokens)
    got = _inserted_decode(fastllava.load(ckpt, device="cpu", kv_cache=spec), ids, mask, pixels, tokens)
    assert 0 < _decode_error(ref, got) < tolerance


def test_insert_row_with_aligned_groups_is_exact():
    """Re-encoding a row whose groups keep their alignment reproduces its codes."""
    spec = "kivi:bits=2,group=4,residual=4"
    x = _keys(b=1, h=2, n=18, d=16)
    src = new_kv_cache(spec, 1, 1, 2, 19, 16, torch.float32, "cpu")
    src.reserve(0, _ones(1, 18))
    src_k, src_v = src.update(0, 0, x, -x, 18)
    dst = new_kv_cache(spec, 1, 3, 2, 40, 16, torch.float32, "cpu")
    dst.insert_row(2, src, 0, reset=True)
    assert dst.lengths == [18] and bool(dst.valid[0, 2, :18].all()) and not bool(dst.valid[0, :2].any())
    step = _keys(b=3, h=2, n=1, d=16, seed=4)
    dst.reserve(0, _ones(3, 1))
    src.reserve(0, _ones(1, 1))
    k, v = dst.update(0, 18, step, step, 19)
    ref_k, ref_v = src.update(0, 18, step[2:], step[2:], 19)
    assert torch.allclose(k[2:], ref_k, atol=1e-5) and torch.allclose(v[2:], ref_v, atol=1e-5)


def test_server_with_a_quantized_cache(tmp_path):
    """Concurrent requests through the server's continuous batching (rows inserted into a shared
    quantized cache mid-decode) all complete; a lone greedy request agrees with generate's
    first tokens (prefill attends in full precision)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from fastllava.serve.settings import Settings
    from serve_helpers import data_url, png_bytes, random_image, running_server, tiny_checkpoint, user_message

    llava = fastllava.load(tiny_checkpoint(tmp_path / "m"), device="cpu", kv_cache="kivi:bits=4,group=4,residual=4")
    with running_server(llava, Settings(model_id="tiny", api_key=None, max_batch_size=4, max_queue=16)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(i):
            message = user_message("describe it .", data_url(png_bytes(random_image(i))))
            return client.chat.completions.create(model="tiny", messages=message, max_tokens=3 + 5 * i, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
        lone = ask(0)
    for i, r in enumerate(replies):
        assert r.usage.completion_tokens <= 3 + 5 * i and r.choices[0].finish_reason in ("stop", "length")
    ref = llava.generate(images=[random_image(0)], prompts=["describe it ."], max_new_tokens=3)[0]
    assert lone.choices[0].message.content.split()[:1] == ref.text.split()[:1]


def test_eval_records_the_quantization(tmp_path):
    from fastllava.evaluation.dataset import generate_dataset
    from fastllava.evaluation.runner import evaluate

    generate_dataset(3, 1, tmp_path / "d", image_size=96)
    model = fastllava.load(device="cpu", weights="int8", kv_cache="vidkv:salient=0.1")
    settings = evaluate(model, tmp_path / "d", batch_size=3, progress=False)["settings"]
    assert settings["weights"] == "int8" and settings["kv_cache"] == "vidkv:group=32,residual=128,high=0.5,salient=0.1"
    assert evaluate(fastllava.load(device="cpu"), tmp_path / "d", progress=False)["settings"]["kv_cache"] == "fp"


def test_cache_sized_after_reduction_before_the_llm(ckpt):
    """A reduction before the language model shortens the prompt: the cache is allocated for what
    remains (16 visual tokens -> 4: 12 slots fewer), full precision or quantized."""
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for kv_cache in (None, "kivi:bits=4,group=4,residual=4"):
        model = fastllava.load(ckpt, device="cpu", kv_cache=kv_cache)
        full, cut = (model.generate(images=[image], prompts=["describe it ."], max_new_tokens=2, reduce=r)[0]
                     for r in (None, "visionzip:keep=4,contextual=1"))
        assert cut.stats["kv_cache_bytes"] < full.stats["kv_cache_bytes"]
    fp = fastllava.load(ckpt, device="cpu")
    full, cut = (fp.generate(images=[image], prompts=["describe it ."], max_new_tokens=2, reduce=r)[0]
                 for r in (None, "visionzip:keep=4,contextual=1"))
    per_slot = 2 * 3 * 4 * 16 * 4  # keys and values, 3 layers, 4 heads of 16, float32
    assert full.stats["kv_cache_bytes"] - cut.stats["kv_cache_bytes"] == 12 * per_slot
