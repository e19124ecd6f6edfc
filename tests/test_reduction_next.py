"""Visual token reduction on a tiny random LLaVA-NeXT model (a 4 x 4 patch grid per tile, 1 to 4
tiles per image): budgets hold exactly per image in a batch of aspect ratios, full budgets are
exact, batches equal single prompts, bad budgets are one-line errors, `inspect` draws each token
where it lies in the image; the per-tile sharing, HiRED's and GlobalCom²'s allocations on crafted
attention."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.cli import main
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.ops import positions_from_mask
from fastllava.reduction import METHODS, GlobalCom2, HiRED, parse_spec
from fastllava.reduction.base import VisionContext, share
from fastllava.reduction.runtime import make_reduction
from hf_reference import IMAGE_TOKEN, PINPOINTS, VOCAB, save_checkpoint, tiny_llava
from test_llava_next import PROCESSOR, WORDS, _batch, _photo

SIZES = [(40, 160), (160, 40), (50, 50), (300, 20)]  # 1:4, 4:1, square, 15:1 -> 68, 76, 88, 28 visual tokens
PROMPTS = ["describe it .", "what is in the picture ?", "what is it ?", "describe the picture ."]
TILED = ["random", "fastervlm", "visionzip", "hired", "globalcom2", "fastervlm+prop", "globalcom2+prop"]  # before the LLM, per tile
EXTRA = {"visionzip": ",contextual=3", "pdrop": ",ratio=1", "dart": ",pivots=3", "fastv": ",layer=1",
         "fastervlm+prop": ",merge=prop", "random+mean": ",merge=mean", "dart+prop": ",pivots=3,merge=prop",
         "visionzip+prop": ",contextual=3,merge=prop", "hired+prop": ",merge=prop", "globalcom2+mean": ",merge=mean",
         "globalcom2+prop": ",merge=prop", "hired+compact": ",positions=compact"}
NEXT_METHODS = [n for n, m in METHODS.items() if m.images != "single"] + ["fastervlm+prop", "random+mean", "dart+prop",
                                                                           "visionzip+prop", "hired+prop", "globalcom2+mean",
                                                                           "hired+compact"]


def spec(name: str, keep: int) -> str:
    return f"{name.split('+')[0]}:keep={keep}{EXTRA.get(name, '')}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_checkpoint(tiny_llava(pinpoints=PINPOINTS, seed=11, kv_heads=2), tmp_path_factory.mktemp("rn"), "new")
    build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return fastllava.load(path, device="cpu", dtype="float32")


def test_sizes_give_different_token_counts(model):
    assert [model.config.image_tokens(h, w) for h, w in SIZES] == [68, 76, 88, 28]


@pytest.mark.parametrize("name", NEXT_METHODS)
def test_full_budget_reproduces_unreduced_logits(model, name):
    for size in SIZES[:3]:  # two prompts around the same image size: keep = all its visual tokens
        ids, mask, pixels, sizes = _batch(model.config, [size, size])
        positions = positions_from_mask(mask)
        ref = model.logits(ids, pixels, mask, positions, image_sizes=sizes)
        got = model.logits(ids, pixels, mask, positions, image_sizes=sizes,
                           reduce=spec(name, model.config.image_tokens(*size)))
        real = mask.bool()
        assert got.shape == ref.shape
        assert (got[real] - ref[real]).abs().max() <= 1e-5, (name, size)


@pytest.mark.parametrize("name", NEXT_METHODS)
def test_budget_holds_for_every_image_of_a_batch(model, name):
    images = [_photo(h, w, i) for i, (h, w) in enumerate(SIZES)] + [None]
    out = model.generate(images=images, prompts=PROMPTS + ["what ?"], max_new_tokens=2, reduce=spec(name, 9))
    method = make_reduction(spec(name, 9), model.config).method
    for img, r in zip(images, out):
        entering = [model.config.image_tokens(img.height, img.width)] if img and method.where == "llm" else []
        want = entering + method.budgets() if img else [0] * (1 + len(method.cuts()))
        assert r.stats["visual_tokens"] == want, name


@pytest.mark.parametrize("name", TILED)
def test_batch_equals_each_image_alone(model, name):
    images = [_photo(h, w, 20 + i) for i, (h, w) in enumerate(SIZES)]
    batched = model.generate(images=images, prompts=PROMPTS, max_new_tokens=5, reduce=spec(name, 20))
    for img, prompt, got in zip(images, PROMPTS, batched):
        alone = model.generate(images=[img], prompts=[prompt], max_new_tokens=5, reduce=spec(name, 20))[0]
        assert got.token_ids == alone.token_ids, name


@pytest.mark.parametrize("name", [None, "fastv", "dart+prop", "fastervlm+prop", "hired"])
def test_fixed_shape_prefill_and_step_give_the_eager_tokens(model, name):
    """The static decode mode (bucket-padded prefill, staged at cuts inside the LLM; fixed-shape
    step) on a batch of tiled images of different token counts answers as eager decoding."""
    images = [_photo(h, w, 30 + i) for i, (h, w) in enumerate(SIZES)]
    reduce = None if name is None else spec(name, 20)
    out = {}
    try:
        for mode in ("eager", "static"):
            model.set_decode(mode)
            out[mode] = [r.token_ids for r in model.generate(images=images, prompts=PROMPTS, max_new_tokens=8,
                                                             reduce=reduce)]
            steps = model.runner.calls
            assert steps["fixed_prefill" if mode == "static" else "eager_prefill"] == 1  # this mode's path ran
    finally:
        model.set_decode("eager")
    assert len(set(map(tuple, out["eager"]))) > 1
    assert out["static"] == out["eager"]


def _parts(model, image) -> tuple[torch.Tensor, object]:
    """Partition of each visual token of one image ([F]: 0 base, 1.. tiles, -1 newline) and its inputs."""
    inputs = model.inputs([image], ["what is it ?"])
    return model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"])["part"][0], inputs


@pytest.mark.parametrize("reduce", ["random:keep=40", "fastervlm:keep=40", "visionzip:keep=40,contextual=0"])
def test_plain_methods_share_the_budget_by_tokens_per_tile(model, reduce):
    image = _photo(64, 64, 3)  # 2 x 2 tiles: the base 16 patches, four tiles of 16, 8 newlines
    part, inputs = _parts(model, image)
    red = make_reduction(reduce, model.config)
    model.logits(**inputs, reduce=red)
    kept = red.owner[0] >= 0
    assert kept.sum() == 40
    per_part = torch.bincount(part[kept & (part >= 0)], minlength=5)
    assert per_part.tolist() == [8] * 5 and not kept[part < 0].any()  # 80 patches: half of each, no newline


def test_merging_stays_among_patches(model):
    """merge=prop before the LLM: every patch joins a kept patch of its image; newlines are never
    merged (dropped unless the budget reaches them)."""
    part, inputs = _parts(model, _photo(64, 64, 3))
    red = make_reduction("fastervlm:keep=40,merge=prop", model.config)
    model.logits(**inputs, reduce=red)
    owner = red.owner[0]
    assert bool((owner[part >= 0] >= 0).all()) and not (owner[part < 0] >= 0).any()
    assert len(set(owner[part >= 0].tolist())) == 40 and bool((part[owner[part >= 0]] >= 0).all())
    assert torch.equal(red.key_bias[red.visual].exp().round().sum(), torch.tensor(80.0))  # 80 patches in 40 groups


def test_newlines_are_kept_only_beyond_the_patches(model):
    part, inputs = _parts(model, _photo(64, 64, 3))
    for keep, newlines in ((80, 0), (84, 4), (88, 8)):
        red = make_reduction(f"fastervlm:keep={keep}", model.config)
        model.logits(**inputs, reduce=red)
        kept = red.owner[0] >= 0
        assert int(kept[part >= 0].sum()) == keep - newlines and int(kept[part < 0].sum()) == newlines


def test_share_is_proportional_and_capped():
    part = torch.arange(3).repeat_interleave(10)[None]  # three partitions of 10
    scores, valid = torch.rand(1, 30), torch.ones(1, 30, dtype=torch.bool)
    keep = share(scores, part, valid, 12, torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.bincount(part[keep], minlength=3).tolist() == [2, 4, 6]
    for p in range(3):  # each partition keeps its best
        inside = scores[0, part[0] == p]
        assert inside[keep[0, part[0] == p]].min() >= inside[~keep[0, part[0] == p]].max()
    small = torch.cat([torch.zeros(2), torch.ones(10), torch.full((10,), 2)]).long()[None]
    keep = share(torch.rand(1, 22), small, torch.ones(1, 22, dtype=torch.bool), 12, torch.tensor([[10.0, 1.0, 1.0]]))
    assert torch.bincount(small[keep], minlength=3).tolist() == [2, 5, 5]  # capped at 2, the rest shared


def _context(model, image, method) -> VisionContext:
    inputs = model.inputs([image], ["what ?"])
    blocks = model.model.cls_blocks(method.early_layer()) if method.needs_cls else ()
    fields = model.model.encode_images(inputs["pixel_values"], inputs["image_sizes"], blocks)
    return VisionContext(**fields, text=None, text_valid=None, grid=model.config.vision.grid, budget=method.keep,
                         project=model.model.multi_modal_projector)


def test_hired_shares_by_early_attention_and_picks_by_final(model):
    method = HiRED(keep=24)
    ctx = _context(model, _photo(64, 64, 5), method)
    part = ctx.part[0]
    content = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0])  # the last tile has 4x the content of the others
    ctx.early_attention = torch.where(part >= 0, content[part.clamp(min=0)] / 16, 0.0)[None]
    keep = method.select(ctx).keep[0]
    assert torch.bincount(part[keep], minlength=5).tolist() == [3, 3, 3, 3, 12]
    final = ctx.cls_attention[0, part == 4]
    assert final[keep[part == 4]].min() >= final[~keep[part == 4]].max()


def test_globalcom2_tiles_follow_the_thumbnail(model):
    method = GlobalCom2(keep=20, tau=0.05)
    ctx = _context(model, _photo(32, 64, 6), method)  # 1 x 2 tiles: left and right halves
    part = ctx.part[0]
    thumb = torch.tensor([[0.1, 0.1, 0.0, 0.0]] * 4).reshape(-1) / 0.8 * 0.9  # thumbnail looks at the left
    ctx.cls_attention = ctx.cls_attention.clone()
    ctx.cls_attention[0, :16] = thumb
    counts = torch.bincount(part[method.select(ctx).keep[0]], minlength=3).tolist()
    assert sum(counts) == 20 and counts[0] == round(20 * 16 / 48) and counts[1] > counts[2]
    flat = GlobalCom2(keep=20, alpha=0.0, tau=1e6)  # equal tile ratios when the thumbnail does not care
    assert torch.bincount(part[flat.select(ctx).keep[0]], minlength=3).tolist() == [7, 7, 6]


@pytest.mark.parametrize("reduce, words", [
    ("hired:keep=0", ["budget 0", "1..88"]),
    ("globalcom2:keep=89", ["budget 89", "1..88"]),
    ("fastervlm:keep=30", ["budget 30", "28 visual tokens"]),  # fits the largest image, not the 15:1 one
    ("hired:keep=20,layer=3", ["vision layer 3", "1..2"]),
    ("globalcom2:keep=20,alpha=2", ["alpha"]),
    ("pool:keep=16", ["pool", "LLaVA-NeXT"]),
])
def test_bad_specs_are_one_line_user_errors(model, reduce, words):
    with pytest.raises(fastllava.UserError) as err:
        model.generate(images=[_photo(h, w, 0) for h, w in SIZES], prompts=PROMPTS, max_new_tokens=1, reduce=reduce)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("name", ["hired", "globalcom2"])
def test_tile_methods_refuse_llava_15(tmp_path, name):
    path = save_checkpoint(tiny_llava(seed=3), tmp_path / "l15", "new")
    with pytest.raises(fastllava.UserError, match="LLaVA-NeXT") as err:
        make_reduction(parse_spec(f"{name}:keep=8"), fastllava.config.LlavaConfig.from_dict(
            json.loads((path / "config.json").read_text())))
    assert "\n" not in str(err.value)



@pytest.mark.parametrize("size, grid, drawn", [((64, 64), (8, 8), (1800, 896)), ((40, 160), (4, 12), (1344, 680)),
                                               ((160, 40), (12, 4), (680, 1344))])
def test_inspect_maps_base_and_tile_tokens_onto_the_image(model, tmp_path, capsys, size, grid, drawn):
    """Two panels of the image at 448 px per 32-px tile, side by side (stacked when wide): the base
    thumbnail's 4 x 4 patches, then the tiles' unpadded rows x cols grid (here 2 x 2 tiles, 1 x 3
    or 3 x 1 tiles); the centre of each token's cell keeps the image's colour when the token is
    kept and is dimmed when it is dropped."""
    (h, w), (rows, cols) = size, grid
    image = _photo(h, w, 7)
    image.save(tmp_path / "im.png")
    assert main(["inspect", "--model", str(model.path), "--device", "cpu", "--image", str(tmp_path / "im.png"),
                 "--prompt", "what is it ?", "--reduce", "fastervlm:keep=30", "--out", str(tmp_path / "o.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    tokens = 16 + rows * (cols + 1)
    assert summary["visual_tokens"] == tokens and summary["kept"] == 30 and summary["dropped"] == tokens - 30
    assert summary["kept_base"] + summary["kept_tiles"] + summary["kept_newlines"] == 30
    out = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"), np.float32)
    band = 72  # the title (spec, counts, the panels' names) and the legend above the panels
    assert (out[:band] < 128).any() and out.shape[1::-1] == (drawn[0], drawn[1] + band)
    out = out[band:]

    red = make_reduction("fastervlm:keep=30", model.config)
    model.logits(**model.inputs([image], ["what is it ?"]), reduce=red)
    kept = (red.owner[0] >= 0).tolist()
    side_by_side = w <= h  # a wide image's panels are stacked
    pw, ph = ((drawn[0] - 8) // 2, drawn[1]) if side_by_side else (drawn[0], (drawn[1] - 8) // 2)
    plain = np.asarray(image.resize((pw, ph), Image.BICUBIC), np.float32)
    cells = [(0, p, (p % 4 + 0.5) / 4, (p // 4 + 0.5) / 4) for p in range(16)]  # (panel, token, x, y in [0, 1])
    cells += [(1, 16 + i * (cols + 1) + j, (j + 0.5) / cols, (i + 0.5) / rows)  # each row ends in a newline
              for i in range(rows) for j in range(cols)]
    for panel, t, x, y in cells:
        x, y = int(x * pw), int(y * ph)
        got = out[y, x + panel * (pw + 8)] if side_by_side else out[y + panel * (ph + 8), x]
        want = plain[y, x] if kept[t] else plain[y, x] * (1 - 170 / 255)
        assert np.abs(got - want).max() <= 2, (panel, t, kept[t])
