"""KV-cache quantizers (KIVI, VidKV): packing, round-trip error bounds, padding, residual flushes,
and the memory the cache really allocates."""

import pytest
import torch

from fastllava import UserError
from fastllava.quant import kivi, vidkv
from fastllava.quant.packing import pack_bits, pack_trits, unpack_bits, unpack_trits
from fastllava.quant.spec import parse_kv_cache
from fastllava.quant.store import QuantizedSequence


def _keys(b=2, h=3, n=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, d, generator=g)
    x[..., 3] = x[..., 3] * 12 + 5  # an outlier channel, as keys have
    return x


def _ones(b, n):
    return torch.ones(b, n, dtype=torch.bool)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 13), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-13 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 13), codes)


def test_pack_trits_round_trip_and_size():
    codes = torch.randint(0, 3, (4, 23), dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.shape[-1] == 5  # ceil(23 / 5): 1.6 bits per code
    assert torch.equal(unpack_trits(packed, 23), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_keys_per_channel_error_bound(bits):
    x = _keys()
    codec = kivi.KeyCodec(bits, 32)
    y = codec.decode(codec.encode(x, _ones(2, 64)), 64)
    xg = x.view(2, 3, 2, 32, 32)  # [B, H, groups, G, D]
    step = (xg.amax(3, keepdim=True) - xg.amin(3, keepdim=True)) / (2**bits - 1)
    err = (y.view_as(xg) - xg).abs()
    assert bool((err <= step / 2 + 1e-5).all())  # round to nearest: half a step at most, per channel
    normal = torch.arange(32) != 3
    rel = float((y - x)[..., normal].norm() / x[..., normal].norm())
    assert rel < {4: 0.1, 2: 0.45}[bits]  # Gaussian channels: ~0.08 at 4 bits, ~0.40 at 2 bits
    per_token = kivi.ValueCodec(bits, 32)  # what KIVI avoids for keys: the outlier spoils every token
    z = per_token.decode(per_token.encode(x, _ones(2, 64)), 64)
    assert float((z - x)[..., normal].norm() / x[..., normal].norm()) > 3 * rel


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_values_per_token_error_bound(bits):
    x = torch.randn(2, 3, 10, 32)
    codec = kivi.ValueCodec(bits, 16)
    y = codec.decode(codec.encode(x, _ones(2, 10)), 10)
    xg = x.view(2, 3, 10, 2, 16)  # per token, groups of 16 channels
    step = (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)) / (2**bits - 1)
    assert bool(((y.view_as(xg) - xg).abs() <= step / 2 + 1e-5).all())
    rel = float((y - x).norm() / x.norm())
    assert rel < {4: 0.08, 2: 0.4}[bits]  # Gaussian data: ~0.07 at 4 bits, ~0.33 at 2 bits


def test_padding_never_widens_a_range():
    x = _keys(b=2, n=32)
    valid = _ones(2, 32)
    valid[1, :7] = False  # row 1 is left-padded by 7 slots
    loud = x.clone()
    loud[1, :, :7] = 1e4  # whatever padding holds must not matter
    for codec in (kivi.KeyCodec(2, 32), vidkv.KeyCodec(32, 0.5, 32), vidkv.ValueCodec(32)):
        quiet = codec.decode(codec.encode(x, valid), 32)
        noisy = codec.decode(codec.encode(loud, valid), 32)
        assert torch.allclose(quiet[1, :, 7:], noisy[1, :, 7:], atol=1e-5)
        assert torch.allclose(quiet[0], noisy[0], atol=1e-5)


def test_vidkv_keys_mixed_precision():
    x = _keys()
    codec = vidkv.KeyCodec(32, 0.25, 32)
    parts = codec.encode(x, _ones(2, 64))
    high = unpack_bits(parts["high_mask"], 1, 32).bool()  # [B, H, groups, D]
    assert bool((high.sum(-1) == 8).all()) and bool(high[..., 3].all())  # the widest channel is kept at 2 bits
    y = codec.decode(parts, 64)
    xg = x.view(2, 3, 2, 32, 32)
    step = (xg.amax(3) - xg.amin(3)) / 3  # [B, H, groups, D]
    err = (y.view_as(xg) - xg).abs().amax(3)
    assert bool((err[high] <= step[high] / 2 + 1e-4).all())
    rel_normal = float((y - x)[..., 4:].norm() / x[..., 4:].norm())
    assert rel_normal < 0.8  # 1 bit (sign x mean magnitude) in the frequency domain
    # bytes per token and head: 8 channels x 2 bits + 24 x 1 bit = 5 bytes
    assert parts["high_codes"].shape[-1] + parts["low_codes"].shape[-1] == 5


def test_rfft_real_is_invertible_and_real_sized():
    for n in (7, 8):
        x = torch.randn(3, n)
        assert vidkv.rfft_real(x).shape[-1] == n
        assert torch.allclose(vidkv.irfft_real(vidkv.rfft_real(x)), x, atol=1e-5)


def test_vidkv_values_ternary_bound():
    x = torch.randn(2, 3, 64, 16)
    codec = vidkv.ValueCodec(32)
    parts = codec.encode(x, _ones(2, 64))
    assert parts["codes"].shape[-1] == 4  # 16 trits in ceil(16 / 5) bytes
    y = codec.decode(parts, 64)
    xg = x.view(2, 3, 2, 32, 16)
    alpha = xg.abs().mean(3, keepdim=True)  # per channel and group of tokens
    bound = torch.maximum(alpha / 2, xg.abs() - alpha)
    assert bool(((y.view_as(xg) - xg).abs() <= bound + 1e-5).all())
    assert set(torch.unique((y.view_as(xg) / alpha).round(decimals=4)).tolist()) <= {-1.0, 0.0, 1.0}


def test_salient_slots_pick_text_related_visual_tokens():
    embeds = torch.zeros(2, 8, 4)
    embeds[:, :, 1] = 0.1
    embeds[:, 6:, 0] = 1.0  # text tokens point along channel 0
    embeds[0, [1, 4], 0] = 5.0  # two visual tokens of row 0 agree with them
    embeds[1, 3, 0] = 5.0
    embeds[1, 5, 0] = -5.0
    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[:, 1:6] = True
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False  # row 1: left padding, visual tokens 3..5 only
    visual &= valid
    slots = vidkv.salient_slots(embeds, visual, valid, 0.4)
    assert slots.tolist() == [[1, 4], [3, -1]]  # round(0.4 * 5) = 2, round(0.4 * 3) = 1


def _seq(flush, residual=64, group=16, max_len=256):
    codec = kivi.KeyCodec(4, group) if flush == "chunk" else kivi.ValueCodec(4, 16)
    return QuantizedSequence(codec, flush, residual, 2, 3, max_len, 32, torch.float32, "cpu"), codec


@pytest.mark.parametrize("flush", ["chunk", "window"])
def test_shorter_than_residual_stays_exact(flush):
    seq, _ = _seq(flush)
    x = _keys(n=40)
    out = seq.append(x, _ones(2, 40))
    assert seq.n_quantized == 0 and torch.equal(out, x)
    step = _keys(n=1, seed=1)
    assert torch.equal(seq.append(step, _ones(2, 41)), torch.cat([x, step], 2))


@pytest.mark.parametrize("n,chunk_q,window_q", [(64, 64, 0), (128, 128, 64), (150, 128, 86), (15, 0, 0)])
def test_flush_points(n, chunk_q, window_q):
    for flush, expect in (("chunk", chunk_q), ("window", window_q)):
        seq, _ = _seq(flush)
        seq.append(_keys(n=n), _ones(2, n))
        assert seq.n_quantized == expect and seq.n_quantized + seq.n_residual == n


@pytest.mark.parametrize("flush", ["chunk", "window"])
def test_decode_steps_match_one_shot(flush):
    """Feeding tokens one by one across flushes stores what quantizing them at once stores, and
    each step returns the store dequantized plus the residual as written."""
    x = _keys(n=150)
    valid = _ones(2, 150)
    one, codec = _seq(flush)
    one.append(x, valid)
    steps, _ = _seq(flush)
    steps.append(x[:, :, :20], valid[:, :20])
    for t in range(20, 150):
        out = steps.append(x[:, :, t:t + 1], valid[:, :t + 1])
        nq = steps.n_quantized
        assert torch.equal(out[:, :, -1:], x[:, :, t:t + 1])  # the new token, as written
    assert steps.n_quantized == one.n_quantized
    q = one.n_quantized
    assert torch.equal(steps.store.read(q), one.store.read(q))
    assert torch.allclose(one.store.read(q), codec.decode(codec.encode(x[:, :, :q], valid[:, :q]), q))
    final = steps.append(x[:, :, :1], _ones(2, 151))
    assert torch.equal(final[:, :, nq:150], x[:, :, nq:150])  # the residual is full precision


@pytest.mark.parametrize("spec", ["int4", "kivi:bits=3", "kivi:group=0", "kivi:residual=20", "kivi:bits",
                                  "vidkv:high=1.5", "vidkv:salient=2", "kivi:foo=1", 7])
def test_bad_kv_specs_are_one_line_user_errors(spec):
    with pytest.raises(UserError) as e:
        parse_kv_cache(spec)
    assert "\n" not in str(e.value) and "kivi" in str(e.value)


def test_kv_spec_defaults():
    assert parse_kv_cache("fp") is None and parse_kv_cache(None) is None
    assert str(parse_kv_cache("kivi")) == "kivi:bits=4,group=32,residual=128"
    assert str(parse_kv_cache(" KIVI:bits=2, residual=64 ")) == "kivi:bits=2,group=32,residual=64"
    assert str(parse_kv_cache("vidkv")) == "vidkv:group=32,residual=128,high=0.5,salient=0"
