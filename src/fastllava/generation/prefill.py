"""The prompt's way through the model: encode the images, splice them into the prompt, apply a
reduction's hook before the language model (`prepare`), then the one staged prefill (`prefill`).

A reduction that cuts inside the language model (FastV, PyramidDrop, SparseVLM, DART) splits the
layers into stages: the layers before a cut run as one call (`run_stage`, compiled in compiled
mode), the cut layer runs on its own and hands the method the attention or keys it reads, and
the method's compaction, whose output length depends on the data, runs between stages. Every
decode mode, `Llava.logits` and the trainer go through this loop; the modes differ only in the
`bucket` that stages are padded to on the right (fixed shapes) and the function that runs them.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from ..models.llava import LlavaModel, Tower
from ..ops import attention_mask, pad_right, round_up
from ..reduction.base import TowerMethod, VisionContext
from ..reduction.runtime import Reduction, check_videos

# (model, cache, x, positions, key_valid, key_bias, first, stop, causal, head) -> run_stage's result
StageFn = Callable[..., torch.Tensor]


def prepare(model: LlavaModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, valid: torch.Tensor,
            positions: torch.Tensor, reduction: Reduction | None = None, image_sizes: torch.Tensor | None = None,
            tower: Tower | None = None, pixel_values_videos=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode the images (through `tower`, a compiled encoder, if given), splice them into the
    prompt input_ids [B, T] (real tokens `valid` [B, T], at `positions` [B, T]) and, with a
    reduction, start its trace and call its hook before the language model. `image_sizes` [N, 2]
    is for LLaVA-NeXT. `pixel_values_videos` (LLaVA-OneVision, LLaVA-NeXT-Video): [V, F, C, H, W],
    or a list of [F_i, C, H, W] when the videos' frame counts differ; their features go where the
    video tokens stand, after the images' are written. A reduction treats each video frame as an
    image of its own (`keep` tokens per frame; see reduction.runtime.check_videos for the methods
    that cannot). -> (embeds [B, T', D], positions [B, T'], valid [B, T'])."""
    method = reduction.method if reduction is not None else None
    if pixel_values_videos is not None and method is not None:
        check_videos(method)
    blocks = ()
    if isinstance(method, TowerMethod):  # the tower runs under the method's plan (models.vision.TowerPlan)
        blocks = (method.plan(model.feature_block, model.cfg.vision.num_patches),)
    elif method is not None and method.where == "vision" and method.needs_cls:
        blocks = model.cls_blocks(method.early_layer())
    images = None if pixel_values is None else model.encode_images(pixel_values, image_sizes, blocks, tower)
    real = None if images is None else images.get("valid")  # [N, P] on LLaVA-NeXT (rows padded), else None
    feats = None if images is None else images["features"] if real is None else images["features"][real]
    frames = None if pixel_values_videos is None else _frames(model, pixel_values_videos, tower)  # one row per frame
    if frames is None:
        x = model.embed(input_ids, feats)
    else:
        x = model.embed(input_ids, feats, frames["features"][frames["valid"]])
    if reduction is None:
        return x, positions, valid
    is_image = (input_ids == model.cfg.image_token_index) & valid  # [B, T]
    if frames is None:
        reduction.start(is_image, None if real is None else real.sum(1))
        units = images
    else:
        is_video = (input_ids == model.cfg.video_token_index) & valid  # [B, T]
        order, counts = _unit_order(is_image, images, is_video, frames["valid"].sum(1))
        is_image = is_image | is_video
        reduction.start(is_image, counts, "an image or video frame")
        units = _join_rows([images, frames], order)
    if method.where != "vision" or units is None:
        return x, positions, valid
    rows = reduction.rows  # [N] the row of each image
    ctx = VisionContext(**units, text=x[rows], text_valid=(valid & ~is_image)[rows], grid=model.cfg.vision.grid,
                        budget=method.keep, project=model.multi_modal_projector)
    return reduction.vision(ctx, x, is_image, valid, positions)


def _frames(model: LlavaModel, pixel_values_videos, tower: Tower | None) -> dict:
    """The videos' frames, one after another, as VisionContext rows (see models.frames)."""
    if not hasattr(model, "encode_frames"):
        raise UserError("this checkpoint takes no videos (LLaVA-OneVision and LLaVA-NeXT-Video checkpoints do)")
    if isinstance(pixel_values_videos, torch.Tensor):
        return model.encode_frames(pixel_values_videos, tower)
    videos = [model.encode_frames(v[None], tower) for v in pixel_values_videos]
    return {k: None if videos[0][k] is None else torch.cat([v[k] for v in videos]) for k in videos[0]}


def _unit_order(is_image: torch.Tensor, images: dict | None, is_video: torch.Tensor,
                frame_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and video frames in the order their tokens stand in the prompt (row by row): the
    images' tokens are is_image [B, T], the frames' is_video [B, T] (frame_counts [F] each)
    -> (order [N + F]: indices into the images then the frames, their token counts [N + F])."""
    image_counts = frame_counts.new_zeros(0)
    if images is not None:
        real = images.get("valid")
        n, p = images["features"].shape[:2]
        image_counts = real.sum(1) if real is not None else frame_counts.new_full((n,), p)
    firsts = []
    for mask, counts in ((is_image, image_counts), (is_video, frame_counts)):
        slots = mask.flatten().nonzero()[:, 0]  # each such token's place in the flattened prompt
        firsts.append(slots[counts.cumsum(0) - counts] if counts.numel() else slots[:0])
    counts = torch.cat([image_counts, frame_counts])
    order = torch.cat(firsts).argsort()
    return order, counts[order]


def _join_rows(parts: list[dict | None], order: torch.Tensor) -> dict:
    """VisionContext fields of images and of video frames (either may be None) -> one set of rows,
    padded to the longest and taken in `order` (see _unit_order). Fields missing in any are None."""
    parts = [p for p in parts if p is not None]
    width = max(p["features"].shape[1] for p in parts)
    out = {}
    for key in ("vision", "features", "cls_attention", "keys", "early_attention", "valid", "part", "where"):
        values = [p.get(key) for p in parts]
        if key == "valid":
            values = [torch.ones(p["features"].shape[:2], dtype=torch.bool, device=p["features"].device)
                      if v is None else v for p, v in zip(parts, values)]
        if any(v is None for v in values):
            out[key] = None
            continue
        fill = -1 if key == "part" else 0
        padded = [torch.nn.functional.pad(v, [0, 0] * (v.dim() - 2) + [0, width - v.shape[1]], value=fill)
                  for v in values]
        out[key] = torch.cat(padded)[order]
    return out


def stage_mask(model: LlavaModel, key_valid: torch.Tensor, key_bias: torch.Tensor | None, causal: bool,
               dtype: torch.dtype, start: int = 0) -> torch.Tensor | None:
    """The mask [B, 1, T, S] of a prefill stage whose T queries sit at slots start..S over the S
    slots key_valid [B, S] marks (key_bias [B, S] or None; start > 0: a cached prefix before them),
    or None when `causal`: plain causal attention is exact (no prefix, padding, bias or window)."""
    if causal:
        return None
    s, window = key_valid.shape[1], model.cfg.text.sliding_window
    return attention_mask(key_valid, start, s - start, s, window if window is not None and s > window else None,
                          key_bias, dtype)


def run_stage(model: LlavaModel, cache, x: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
              key_bias: torch.Tensor | None, first: int, stop: int, causal: bool, head: str | None,
              start: int = 0) -> torch.Tensor:
    """x [B, T, D] at positions [B, T] through layers first..stop-1 of a stage whose slots are
    key_valid [B, start + T] (with key_bias [B, start + T] or None; `causal`: see stage_mask),
    written to the cache's slots start..start+T if there is one (slots 0..start: a cached prefix)
    -> hidden states [B, T, D] (head None), logits [B, T, V] ("all"), or the logits at each row's
    last valid slot [B, V] ("last")."""
    lm = model.language_model
    cos, sin = lm.rotary(positions, x.dtype)
    mask = stage_mask(model, key_valid, key_bias, causal, x.dtype, start)
    x = lm.run(x, cos, sin, mask, cache, start, start + x.shape[1], range(first, stop))[0]
    if head == "last":
        slots = torch.arange(x.shape[1], device=x.device)
        last = torch.where(key_valid[:, start:], slots, -1).amax(1)  # [B] (found on the device: no host wait)
        return model.head(x.gather(1, last[:, None, None].expand(-1, 1, x.shape[2])))[:, -1]  # [B, V]
    return model.head(x) if head == "all" else x


def prefill(model: LlavaModel, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cache=None,
            reduction: Reduction | None = None, bucket: int = 1, stage_fn: StageFn = run_stage,
            head: str = "last", start: int = 0) -> torch.Tensor:
    """The staged prefill of embeds [B, T, D] at positions [B, T], real tokens valid [B, T]
    (left-padded), into an empty `cache` (or none) -> run_stage's result for `head` ("last":
    [B, V]; "all": [B, T', V], T' the length after the last cut). With `start`, the cache already
    holds a prompt's first `start` slots (a cached prefix, without a reduction) and embeds are
    the rest of it.

    Each stage is padded on the right to a multiple of `bucket` (its padding is invalid, and under
    causal attention no real token sees it) and run by `stage_fn` (run_stage or a compiled
    version of it). A cut layer runs unpadded through run_stage's layer loop with the attention
    its method reads; the method then compacts the sequence. Merged tokens bring their attention
    bias (`reduction.key_bias`, proportional attention), which the cache keeps for decoding."""
    lm = model.language_model
    pruner = reduction if reduction is not None and reduction.cuts else None
    bias = None if reduction is None else reduction.key_bias  # [B, T]
    firsts = [0] + ([c + 1 for c in pruner.cuts] if pruner is not None else [])  # each stage's first layer
    if start and (reduction is not None or cache is None):
        raise RuntimeError("a cached prefix is continued in its cache, without a reduction")
    if cache is not None:
        if cache.length != start:
            raise RuntimeError(f"the prefill runs on a cache holding its prefix ({start} slots), not {cache.length}")
        for first in firsts:
            cache.split(first)
    x = embeds
    for first, nxt in zip(firsts, firsts[1:] + [None]):
        t = x.shape[1]
        pad = round_up(t, bucket) - t
        key_valid = pad_right(valid, pad)  # [B, T + pad]
        key_bias = None if bias is None else pad_right(bias, pad)
        causal = not start and bias is None and bool(valid.all()) and _no_window(model, t + pad)
        if cache is not None:
            cache.reserve(first, key_valid)
            if key_bias is not None:
                cache.set_bias(first, 0, key_bias)
        padded = pad_right(x, pad), pad_right(positions, pad)  # [B, T + pad, D], [B, T + pad]
        if nxt is None:
            if start:
                key_valid = cache.valid[first][:, :start + t + pad]  # [B, start + T + pad]: the prefix's too
            out = stage_fn(model, cache, *padded, key_valid, key_bias, first, len(lm.layers), causal, head, start)
            return out if head == "last" or not pad else out[:, :t]
        cut = nxt - 1
        if cut > first:
            x = stage_fn(model, cache, *padded, key_valid, key_bias, first, cut, causal, None)[:, :t]
        key_valid, key_bias = valid, bias
        cos, sin = lm.rotary(positions, x.dtype)
        mask = stage_mask(model, key_valid, key_bias, causal, x.dtype)
        x, probs, keys = lm.run(x, cos, sin, mask, cache, 0, t, range(cut, nxt), pruner.attention)
        x, positions, valid = pruner(cut, x, probs, keys, valid, positions)  # [B, T', D], [B, T'], [B, T']
        bias = pruner.key_bias


def _no_window(model: LlavaModel, t: int) -> bool:
    window = model.cfg.text.sliding_window
    return window is None or t <= window
