"""Visual token reduction on prompts with videos (tiny random LLaVA-NeXT-Video and LLaVA-OneVision
checkpoints): every frame is budgeted as an image of its own, before the LLM (random, divprune,
cdpruner, mmtok) and inside it (fastv, pdrop, sparsevlm, dart); images and frames mixed in a
prompt each keep their budget; keeping every frame token changes nothing; a batch answers as its
prompts do alone; the counts reach the stats."""

import pytest
import torch
from hf_reference import save_checkpoint, tiny_next_video, tiny_onevision
from test_next_video import TOWER, _checkpoint
from test_onevision import _hf_processor, _photo
from test_video import _clip, _tokenizer

import fastllava
from fastllava.reduction.runtime import make_reduction

BEFORE = ("random", "random:merge=mean", "divprune", "cdpruner", "mmtok")
INSIDE = ("fastv:layer=1", "pdrop:layers=1-2", "sparsevlm:layer=1", "dart:layer=1")


@pytest.fixture(scope="module")
def nv(tmp_path_factory):
    path = _checkpoint(tiny_next_video(seed=9, image_size=TOWER), tmp_path_factory.mktemp("nv-reduce"))
    return fastllava.load(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    path = save_checkpoint(tiny_onevision(seed=7), tmp_path_factory.mktemp("ov-reduce"))
    _tokenizer(path)
    _hf_processor().save_pretrained(path)
    return fastllava.load(path, device="cpu", dtype="float32")


def _spec(method: str, keep: int) -> str:
    name, _, params = method.partition(":")
    return f"{name}:keep={keep}" + (f",{params}" if params else "")


def _units(llava, ids: torch.Tensor) -> list[list[int]]:
    """Each row's visual units in prompt order, as lengths: its image (all its image tokens: one
    image per prompt here) and its video's frames (frame_tokens each; OneVision's newline is a
    unit's extra token, counted with the last frame)."""
    cfg, out = llava.config, []
    for row in ids:
        units, i, t = [], 0, row.tolist()
        while i < len(t):
            if t[i] == cfg.image_token_index:
                n = next((j for j in range(i, len(t)) if t[j] != cfg.image_token_index), len(t)) - i
                units.append(("image", n))
                i += n
            elif t[i] == cfg.video_token_index:
                n = next((j for j in range(i, len(t)) if t[j] != cfg.video_token_index), len(t)) - i
                frames = n // cfg.frame_tokens
                units += [("frame", cfg.frame_tokens)] * (frames - 1) + [("frame", n - cfg.frame_tokens * (frames - 1))]
                i += n
            else:
                i += 1
        out.append(units)
    return out


def _kept_per_unit(llava, inputs, spec) -> list[list[tuple[str, int]]]:
    """Run the prompts' prefill with `spec`; -> per row, per unit, (kind, tokens it keeps)."""
    reduction = make_reduction(spec, llava.config)
    llava.logits(**inputs, reduce=reduction)
    out = []
    for row, units in enumerate(_units(llava, inputs["input_ids"])):
        owner = reduction.owner[row]  # [V]: each original visual token's representative, -1 dropped
        kept, start = [], 0
        for kind, n in units:
            mine = owner[start:start + n]
            kept.append((kind, int((mine == torch.arange(start, start + n)).sum())))
            start += n
        out.append(kept)
    return out


def test_every_frame_and_image_keeps_its_budget(nv):
    """A batch of an image + video prompt, a video prompt and an image prompt: before the LLM every
    image and every frame keeps `keep` tokens (so the units are matched to their tokens in prompt
    order: an image has more tokens than a frame); inside it each row keeps `keep` per unit."""
    k = nv.config.frame_tokens - 2
    inputs = nv.inputs([_photo(40, 200, 1), None, _photo(60, 60, 2)], ["is it in the clip ?", "describe it .", "what ?"],
                       [_clip(8, 40, 40, 2), _clip(5, 30, 50, 3), None], num_frames=4)
    for method in BEFORE:
        kept = _kept_per_unit(nv, inputs, _spec(method, k))
        assert kept == [[(kind, k) for kind, _ in row] for row in _units(nv, inputs["input_ids"])], method
        assert [len(r) for r in kept] == [5, 4, 1]
    for method in INSIDE:
        reduction = make_reduction(_spec(method, k), nv.config)
        nv.logits(**inputs, reduce=reduction)
        assert reduction.counts[1].tolist() == [5 * k, 4 * k, k], method


def test_keeping_every_frame_token_changes_nothing(nv):
    """With keep = a frame's tokens on video prompts, nothing is dropped: the same logits as
    without a reduction, for methods before and inside the LLM."""
    inputs = nv.inputs([None, None], ["describe it .", "what is in the clip ?"], [_clip(8, 40, 40, 2), _clip(6, 30, 50, 4)],
                       num_frames=4)
    real = inputs["attention_mask"].bool()
    plain = nv.logits(**inputs)
    for method in BEFORE + INSIDE:
        method += ",ratio=1" if method.startswith("pdrop") else ""  # its later stages keep all too
        out = nv.logits(**inputs, reduce=_spec(method, nv.config.frame_tokens))
        assert out.shape == plain.shape, method
        assert (out[real] - plain[real]).abs().max().item() <= 1e-5, method


def test_a_batch_answers_as_its_prompts_alone(nv):
    """generate with a reduction on a batch mixing image + video, video and image prompts gives
    each prompt's tokens alone, and the stats count the visual tokens kept."""
    images = [_photo(40, 200, 1), None, _photo(60, 60, 2)]
    prompts = ["is it in the clip ?", "describe it .", "what ?"]
    videos = [_clip(8, 40, 40, 2), _clip(5, 30, 50, 3), None]
    k = 4
    for spec in ("divprune:keep=4", "random:keep=4,merge=mean", "fastv:keep=4,layer=1"):
        out = nv.generate(images=images, prompts=prompts, videos=videos, num_frames=4, max_new_tokens=6, reduce=spec)
        for i in range(3):
            alone = nv.generate(images=[images[i]], prompts=[prompts[i]], videos=[videos[i]], num_frames=4,
                                max_new_tokens=6, reduce=spec)[0]
            assert out[i].token_ids == alone.token_ids, (spec, i)
        units = [5, 4, 1]
        assert [r.stats["visual_tokens"][-1] for r in out] == [k * u for u in units], spec
    assert out[1].stats["visual_tokens"] == [nv.config.video_tokens(4), 4 * k]  # fastv: entering, then kept


def test_onevision_frames_and_the_closing_newline(ov):
    """LLaVA-OneVision (no class token; one image_newline after a video): a frame keeps `keep`
    tokens, the newline is kept only when a frame's whole budget is its patches'; videos of
    different frame counts in one batch; methods that read a class token are refused in one line."""
    cfg = ov.config
    videos = [_clip(3, 32, 32, 5), _clip(12, 32, 48, 6)]
    inputs = ov.inputs([None, _photo(40, 60, 0)], ["describe it .", "what is it ?"], videos, num_frames=8)
    assert [v.shape[0] for v in inputs["pixel_values_videos"]] == [3, 8]
    for method in ("divprune", "cdpruner", "mmtok", "random"):
        kept = _kept_per_unit(ov, inputs, _spec(method, 2))
        assert kept[0] == [("frame", 2)] * 3 and kept[1] == [("image", 2)] + [("frame", 2)] * 8, method
    out = ov.generate(prompts=["describe it ."], videos=[videos[0]], max_new_tokens=4, reduce=f"divprune:keep={cfg.frame_tokens}")
    assert out[0].stats["visual_tokens"] == [3 * cfg.frame_tokens]  # all but the newline (of 3 * frame_tokens + 1)
    out = ov.generate(prompts=["describe it ."], videos=[videos[0]], max_new_tokens=4, reduce="fastv:keep=2,layer=1")
    assert out[0].stats["visual_tokens"] == [cfg.video_tokens(3), 6] and out[0].token_ids
    with pytest.raises(fastllava.UserError, match="class token") as e:
        ov.generate(prompts=["describe it ."], videos=[videos[0]], reduce="fastervlm:keep=2")
    assert "\n" not in str(e.value)
