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
from ..reduction.runtime import Reduction

# (model, cache, x, positions, key_valid, key_bias, first, stop, causal, head) -> run_stage's result
StageFn = Callable[..., torch.Tensor]


def prepare(model: LlavaModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, valid: torch.Tensor,
            positions: torch.Tensor, reduction: Reduction | None = None, image_sizes: torch.Tensor | None = None,
            tower: Tower | None = None, pixel_values_videos=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode the images (through `tower`, a compiled encoder, if given), splice them into the
    prompt input_ids [B, T] (real tokens `valid` [B, T], at `positions` [B, T]) and, with a
    reduction, start its trace and call its hook before the language model. `image_sizes` [N, 2]
    is for LLaVA-NeXT. `pixel_values_videos` (LLaVA-OneVision): [V, F, C, H, W], or a list of
    [F_i, C, H, W] when the videos' frame counts differ; their features go where the video
    tokens stand, after the images' are written. -> (embeds [B, T', D], positions [B, T'], valid [B, T'])."""
    if pixel_values_videos is not None and reduction is not None:
        raise UserError("visual token reduction does not apply to prompts with videos yet")
    method = reduction.method if reduction is not None else None
    blocks = ()
    if isinstance(method, TowerMethod):  # the tower runs under the method's plan (models.vision.TowerPlan)
        blocks = (method.plan(model.feature_block, model.cfg.vision.num_patches),)
    elif method is not None and method.where == "vision" and method.needs_cls:
        blocks = model.cls_blocks(method.early_layer())
    images = None if pixel_values is None else model.encode_images(pixel_values, image_sizes, blocks, tower)
    real = None if images is None else images.get("valid")  # [N, P] on LLaVA-NeXT (rows padded), else None
    feats = None if images is None else images["features"] if real is None else images["features"][real]
    if pixel_values_videos is None:
        x = model.embed(input_ids, feats)
    else:
        x = model.embed(input_ids, feats, _video_features(model, pixel_values_videos, tower))
    if reduction is None:
        return x, positions, valid
    is_image = (input_ids == model.cfg.image_token_index) & valid  # [B, T]
    reduction.start(is_image, None if real is None else real.sum(1))
    if method.where != "vision" or images is None:
        return x, positions, valid
    rows = reduction.rows  # [N] the row of each image
    ctx = VisionContext(**images, text=x[rows], text_valid=(valid & ~is_image)[rows], grid=model.cfg.vision.grid,
                        budget=method.keep, project=model.multi_modal_projector)
    return reduction.vision(ctx, x, is_image, valid, positions)


def _video_features(model: LlavaModel, pixel_values_videos, tower: Tower | None) -> torch.Tensor:
    """The videos' features one after another [sum F, D] (see OnevisionModel.encode_videos)."""
    if not hasattr(model, "encode_videos"):
        raise UserError("this checkpoint takes no videos (LLaVA-OneVision and LLaVA-NeXT-Video checkpoints do)")
    if isinstance(pixel_values_videos, torch.Tensor):
        return model.encode_videos(pixel_values_videos, tower).flatten(0, 1)
    return torch.cat([model.encode_videos(v[None], tower)[0] for v in pixel_values_videos])


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
