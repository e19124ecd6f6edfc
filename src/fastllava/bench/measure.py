"""Timing of one benchmark case (a batch size and a visual-token budget): fastllava and,
optionally, transformers on the same weights and inputs. Medians over repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .. import anyres
from ..generation import Runner, SamplingParams, StepTimes, decode_steps, sync
from ..generation.speculate import SpecStats, Speculation, speculative_steps
from ..models.llava import LlavaModel
from ..reduction.runtime import make_reduction

TEXT_BEFORE_IMAGE = 5  # "<s> USER: ..." as in the reference figures: 5 text + image + the rest
IMAGE_HW = (672, 672)  # LLaVA-NeXT: the image's (height, width), tiled 2 x 2 at llava-next-7b's pinpoints


@dataclass
class Case:
    batch: int
    keep: int | None  # visual tokens kept per image (per video frame with frames); None = all
    text_tokens: int = 40
    new_tokens: int = 32
    frames: int | None = None  # a video of this many frames instead of the image (OneVision, NeXT-Video)


def image_tokens(model: LlavaModel) -> int:
    """Visual tokens of one benchmark image (LLaVA-NeXT: an image of IMAGE_HW)."""
    return model.cfg.image_tokens(*IMAGE_HW)


def video_tokens(model: LlavaModel, case: Case) -> int:
    """Visual tokens of the case's input: its video's when it has frames, else one image's."""
    return model.cfg.video_tokens(case.frames) if case.frames else image_tokens(model)


def _text_ids(cfg, b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random text ids [b, n] in [3, vocab) that are neither the image nor the video token."""
    special = sorted({cfg.image_token_index} | ({cfg.video_token_index} if cfg.takes_videos else set()))
    text = torch.randint(3, cfg.text.vocab_size - len(special), (b, n), generator=gen)
    for s in special:  # skip each special id in turn, from the smallest
        text += (text >= s).long()
    return text


def bench_video_inputs(model: LlavaModel, case: Case, seed: int = 0):
    """Random prompt ids [B, T] (text, then a video's tokens, then text), their mask [B, T] and
    random frames pixel_values_videos [B, F, 3, H, W] in the model's dtype, F = case.frames."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    b, after = case.batch, max(1, case.text_tokens - TEXT_BEFORE_IMAGE)
    text = _text_ids(cfg, b, TEXT_BEFORE_IMAGE + after, gen)
    video = torch.full((b, cfg.video_tokens(case.frames)), cfg.video_token_index)
    ids = torch.cat([text[:, :TEXT_BEFORE_IMAGE], video, text[:, TEXT_BEFORE_IMAGE:]], dim=1)
    side = cfg.vision.image_size
    frames = torch.randn(b, case.frames, 3, side, side, generator=gen).to(model.dtype)
    return ids, torch.ones_like(ids), frames


def bench_inputs(model: LlavaModel, case: Case, seed: int = 0):
    """Random prompt ids [B, T] (text, then the image tokens, then text), their mask [B, T],
    random pixel values [B, 3, H, W] in the model's dtype ([B, P, 3, H, W] tiles for LLaVA-NeXT)
    and the image sizes [B, 2] (None but for LLaVA-NeXT)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    n_img, b = image_tokens(model), case.batch
    after = max(1, case.text_tokens - TEXT_BEFORE_IMAGE)
    text = _text_ids(cfg, b, TEXT_BEFORE_IMAGE + after, gen)
    image = torch.full((b, n_img), cfg.image_token_index)
    ids = torch.cat([text[:, :TEXT_BEFORE_IMAGE], image, text[:, TEXT_BEFORE_IMAGE:]], dim=1)
    side, sizes, tiles = cfg.vision.image_size, None, ()
    if cfg.is_next:
        rows, cols = anyres.tile_grid(IMAGE_HW, cfg.image_grid_pinpoints, side)
        sizes, tiles = torch.tensor([IMAGE_HW] * b), (rows * cols + 1,)
    pixels = torch.randn(b, *tiles, 3, side, side, generator=gen).to(model.dtype)
    return ids, torch.ones_like(ids), pixels, sizes


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@torch.inference_mode()
def time_ours(runner: Runner, case: Case, reduce: str | None, repeats: int, warmup: int,
              speculate: Speculation | None = None) -> dict:
    """Medians of: vision tower, projector (in compiled mode: both in the compiled call that
    generation makes, projector None), prefill (embedding + language model + first sample),
    time to first token, decode speed per sequence, end-to-end time; peak memory, KV bytes; the
    first run's wall time, `first_run_s` (with --decode compiled: the compilation), and the
    greedy tokens of the last run [B, N]."""
    model = runner.model
    device = model.device
    inputs = _inputs(model, case, device)
    pixels = inputs[2]
    params = SamplingParams(max_new_tokens=case.new_tokens).validate()
    runs, tokens, first_run = [], None, None
    compiled = runner.tower()  # in compiled mode, the compiled tower + projector that generation uses
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        if case.frames:  # every frame through the tower, projector and pooling, in one call
            model.encode_videos(inputs[4], compiled)
            sync(device)
            t1 = t2 = time.perf_counter()
        elif compiled is not None:  # the compiled tower and projector, one call: no projector time apart
            compiled(pixels.flatten(0, -4), ())
            sync(device)
            t1 = t2 = time.perf_counter()
        else:
            states = model.vision_features(pixels.flatten(0, -4))  # every tile of every image
            sync(device)
            t1 = time.perf_counter()
            model.multi_modal_projector(states)
            sync(device)
            t2 = time.perf_counter()
        _reset_peak(device)
        times = StepTimes()
        spec_stats = SpecStats([], [], [])
        tokens = _generate(runner, inputs, params, reduce, times, speculate, spec_stats)
        if first_run is None:
            first_run = time.perf_counter() - t0
        if i < warmup:
            continue
        runs.append({
            "vision_s": t1 - t0, "projector_s": None if compiled is not None or case.frames else t2 - t1,
            "prefill_s": times.first_token_s - times.vision_s,
            "ttft_s": times.first_token_s, "e2e_s": times.end_s,
            "decode_tok_s": (tokens.shape[1] - 1) / (times.end_s - times.first_token_s),
            "peak_bytes": _peak(device), "kv_cache_bytes": times.kv_cache_bytes,
        })
    out = {**_medians(runs), "first_run_s": first_run, "tokens": tokens}
    if speculate is not None:  # the last run's drafts over the batch
        drafted, kept = sum(spec_stats.draft_tokens), sum(spec_stats.accepted_tokens)
        out["speculate"] = {"spec": speculate.spec(), "draft_tokens": drafted, "accepted_tokens": kept,
                            "acceptance": kept / drafted if drafted else 0.0,
                            "tokens_per_step": (tokens.numel() - tokens.shape[0]) / max(sum(spec_stats.rounds), 1)}
    return out


@torch.inference_mode()
def profile_ours(runner: Runner, case: Case, reduce: str | None, rows: int = 30,
                 speculate: Speculation | None = None) -> str:
    """One more generation of the case under torch.profiler -> the table of its `rows` costliest
    operators and kernels by time on the device (by CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    model = runner.model
    device = model.device
    params = SamplingParams(max_new_tokens=case.new_tokens).validate()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _generate(runner, _inputs(model, case, device), params, reduce, StepTimes(), speculate)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _inputs(model: LlavaModel, case: Case, device: torch.device) -> tuple:
    """(ids, mask, pixels, image sizes, videos) of a case, pixels and videos on `device`: an image's
    (bench_inputs; videos None), or a video's (bench_video_inputs; pixels and sizes None)."""
    if case.frames:
        ids, mask, videos = bench_video_inputs(model, case)
        return ids, mask, None, None, videos.to(device)
    ids, mask, pixels, sizes = bench_inputs(model, case)
    return ids, mask, pixels.to(device), sizes, None


def _generate(runner: Runner, inputs: tuple, params: SamplingParams, reduce: str | None, times: StepTimes,
              speculate: Speculation | None = None, spec_stats: SpecStats | None = None) -> torch.Tensor:
    """One greedy generation of inputs (ids, mask, pixels, image sizes, videos: _inputs) under
    a fresh reduction of `reduce` (and `speculate`, if given) -> the tokens [B, N] (no EOS: every
    row runs to N); `times` gets its marks."""
    ids, mask, pixels, sizes, videos = inputs
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    reduction = make_reduction(reduce, runner.model.cfg)
    if speculate is None:
        steps = list(decode_steps(runner, ids, mask, pixels, params, [], finished, times, reduction, sizes, videos))
        return torch.stack(steps, dim=1)
    rows = [[] for _ in range(ids.shape[0])]
    for new in speculative_steps(runner, speculate, ids, mask, pixels, params, [], finished, times,
                                 spec_stats or SpecStats([], [], []), reduction, sizes, None, videos):
        for r, tokens in enumerate(new):
            rows[r] += tokens
    return torch.tensor(rows, dtype=torch.long)


def _medians(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def hf_twin(model: LlavaModel):
    """transformers' LlavaForConditionalGeneration (LlavaNext... for LLaVA-NeXT) with `model`'s
    config and weights, on the same device and dtype (transformers is needed for this, and only for this)."""
    try:
        import transformers
    except ImportError:
        from ..errors import UserError

        raise UserError("--compare hf needs transformers: pip install 'transformers>=4.52'") from None
    from ..checkpoint import weights_by_key
    from ..config import to_hf_dict

    kind = "LlavaNext" if model.cfg.is_next else "Llava"
    cfg = getattr(transformers, f"{kind}Config")(**to_hf_dict(model.cfg))
    with torch.device(model.device):
        hf = getattr(transformers, f"{kind}ForConditionalGeneration")._from_config(
            cfg, dtype=model.dtype, attn_implementation="sdpa")
    lookup = weights_by_key(model)
    with torch.no_grad():
        for key, tensor in hf.state_dict().items():
            ours = lookup(key)
            if ours is not None:
                tensor.copy_(ours)
            elif "post_layernorm" in key:  # CLIP's last norm, which LLaVA never reads
                tensor.fill_(1.0 if key.endswith("weight") else 0.0)
    hf.generation_config.eos_token_id = None  # always N tokens, like ours, without suppressing EOS
    return hf.eval()


@torch.inference_mode()
def time_hf(hf, model: LlavaModel, case: Case, repeats: int, warmup: int) -> dict:
    """transformers' `generate` (greedy, dynamic cache) on the same inputs: time to first token
    (a 1-token generate), end-to-end for N tokens, decode speed from their difference."""
    device = model.device
    ids, mask, pixels, sizes = (t if t is None else t.to(device) for t in bench_inputs(model, case))
    runs, tokens = [], None
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False)
    if sizes is not None:
        kw["image_sizes"] = sizes
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        hf.generate(**kw, max_new_tokens=1)
        sync(device)
        t1 = time.perf_counter()
        out = hf.generate(**kw, max_new_tokens=case.new_tokens)
        sync(device)
        t2 = time.perf_counter()
        if i < warmup:
            continue
        tokens = out[:, ids.shape[1]:].cpu()
        e2e = t2 - t1
        runs.append({"ttft_s": t1 - t0, "e2e_s": e2e,
                     "decode_tok_s": (case.new_tokens - 1) / max(e2e - (t1 - t0), 1e-9)})
    return {**_medians(runs), "tokens": tokens}
