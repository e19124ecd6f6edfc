"""Applying a method during one prefill: the hook calls, sequence compaction, and the trace of
what was kept (token counts for the stats, patch ownership for `inspect`, selections for replay).

Sequences stay left-padded: after a cut every row's kept tokens are packed to the right of a
shorter [B, T'] tensor, padding is re-marked, and every token keeps its original position.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.vision import absolute_layer
from ..ops import positions_from_mask
from .base import LayerContext, Method, Selection, TowerMethod, VisionContext, candidates, take
from .registry import parse_spec


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, T] -> (index [B, T'] of the kept tokens packed to the right, valid [B, T'])."""
    counts = keep.sum(1)  # [B]
    width = max(int(counts.max()), 1)
    rows, cols = keep.nonzero(as_tuple=True)
    dest = (keep.long().cumsum(1) - 1 + (width - counts)[:, None])[rows, cols]
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    index[rows, dest] = cols
    valid[rows, dest] = True
    return index, valid


class Reduction:
    """One prefill's reduction: calls the method at its hook (or replays recorded selections),
    compacts the sequence, and keeps the trace.

    Trace: `counts` holds the visual tokens per row [B] entering the LLM, then after each cut;
    `owner` [B, V] maps each visual token of the unreduced prompt (V per row, in order) to the
    one that represents it now (itself, the token it was merged into, or -1 when dropped);
    `selections` is what the method chose, in order, to replay with `Reduction(m, n, replay=...)`.
    `sizes` [B, T] holds how many original tokens each token of the current sequence stands for,
    and `key_bias` [B, T] their logs once a selection asked for proportional attention (else None):
    the language model adds it to the attention logits of those keys in every later layer.
    """

    def __init__(self, method: Method, tokens_per_image: int, replay: list[Selection] | None = None):
        self.method = method
        self.tokens_per_image = tokens_per_image
        self.replay = replay
        self.selections: list[Selection] = []
        self.cuts = method.cuts()  # a method before the LLM may cut inside it too (visiondrop:llm=...)
        self.attention = method.attention_queries() if method.needs_attention else None  # None, "all" or "last"
        self.counts: list[torch.Tensor] = []

    def start(self, visual: torch.Tensor, image_counts: torch.Tensor | None = None, unit: str = "an image") -> None:
        """Begin with the unreduced prompt's visual tokens visual [B, T], made of images (or video
        frames: each is budgeted as an image) with image_counts [N] tokens each, in order row by row
        (default: tokens_per_image each). `unit` names them in errors."""
        self.visual = visual  # [B, T] visual tokens of the current sequence
        self.sizes = torch.ones(visual.shape, device=visual.device)  # [B, T] original tokens each stands for
        self.key_bias = None
        self.patch = (visual.long().cumsum(1) - 1).masked_fill(~visual, -1)  # [B, T] index among the row's originals
        n = visual.sum(1)  # [B]
        if image_counts is None:
            image_counts = torch.full((int(n.sum()) // self.tokens_per_image,), self.tokens_per_image)
        counts = image_counts.to(visual.device)
        first = counts.cumsum(0) - counts  # [N] first token of each image among all rows' visual tokens
        row_first = n.cumsum(0) - n  # [B]
        self.rows = torch.searchsorted(row_first, first, right=True) - 1  # [N] the row of each image
        self.starts = first - row_first[self.rows]  # [N] first token of each image among its row's
        self.images = torch.bincount(self.rows, minlength=visual.shape[0])  # [B]
        if counts.numel():
            check_fits(self.method, int(counts.min()), f"{unit} in this batch")
        width = torch.arange(max(int(n.max()), 1), device=visual.device)[None]
        self.owner = width.expand(visual.shape[0], -1).masked_fill(width >= n[:, None], -1)  # [B, V]
        if self.method.where == "llm":
            self.counts.append(n)

    def _choose(self, ctx) -> Selection:
        sel = self.replay[len(self.selections)] if self.replay is not None else self.method.select(ctx)
        self.selections.append(sel)
        return sel

    def vision(self, ctx: VisionContext, x: torch.Tensor, is_image: torch.Tensor, valid: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook (a): x [B, T, D] embeddings with all image features spliced in -> the compacted
        (x, positions, valid) holding only the kept (or merged) visual tokens."""
        sel = self._choose(ctx)
        cand, cand_valid = candidates(is_image)
        x, positions, valid = self._apply(_to_rows(sel, cand_valid, ctx.valid, self.starts), cand, cand_valid, x,
                                          valid, positions)
        if self.method.positions == "compact":  # the shortened prompt numbered 0, 1, 2, ...
            positions = positions_from_mask(valid)
        return x, positions, valid

    def __call__(self, layer: int, x: torch.Tensor, probs: torch.Tensor | None, keys: torch.Tensor,
                 valid: torch.Tensor, positions: torch.Tensor):
        """Hook (b), after `layer`: -> the compacted (x, positions, valid)."""
        cut = self.cuts.index(layer)
        cand, cand_valid = candidates(self.visual)
        first = 1 if self.method.where == "vision" else 0  # budgets()[0]: the budget before the LLM
        budget = self.images * self.method.budgets()[cut + first]  # [B]
        ctx = LayerContext(layer, cut, x, probs, keys, valid, self.visual, cand, cand_valid, budget, self.sizes)
        return self._apply(self._choose(ctx), cand, cand_valid, x, valid, positions)

    def _apply(self, sel: Selection, cand, cand_valid, x, valid, positions):
        """Keep the selected candidates cand [B, N] (writing merged values), update the owners,
        compact the sequence."""
        chosen = sel.keep & cand_valid  # [B, N]
        rows, cols = chosen.nonzero(as_tuple=True)
        keep = valid & ~self.visual
        keep[rows, cand[rows, cols]] = True
        if sel.values is not None:
            x = x.clone()
            x[rows, cand[rows, cols]] = sel.values[rows, cols].to(x.dtype)
        if sel.sizes is not None:
            self.sizes = self.sizes.clone()
            self.sizes[rows, cand[rows, cols]] = sel.sizes[rows, cols].float()
        self._own(sel, cand, cand_valid, chosen)
        index, valid = compact(keep)
        self.sizes = take(self.sizes, index).masked_fill(~valid, 1)
        if sel.sizes is not None or self.key_bias is not None:
            self.key_bias = self.sizes.log()  # [B, T'] proportional attention from here on
        self.visual = take(self.visual, index) & valid
        self.patch = take(self.patch, index).masked_fill(~self.visual, -1)
        self.counts.append(self.visual.sum(1))
        return take(x, index), take(positions, index).masked_fill(~valid, 0), valid

    def _own(self, sel: Selection, cand: torch.Tensor, cand_valid: torch.Tensor, chosen: torch.Tensor) -> None:
        """Re-map `owner` after a selection over the candidates cand [B, N]."""
        patch = self.patch.gather(1, cand).masked_fill(~cand_valid, -1)  # [B, N] original index
        if sel.groups is None:
            target = patch.masked_fill(~chosen, -1)
        else:
            g = sel.groups
            target = torch.where(g >= 0, patch.gather(1, g.clamp(min=0)), torch.full_like(g, -1))
        lut = torch.full((cand.shape[0], self.owner.shape[1] + 1), -1, dtype=torch.long, device=cand.device)
        lut.scatter_(1, patch + 1, target)  # column 0 collects the padding candidates
        lut[:, 0] = -1
        self.owner = torch.where(self.owner >= 0, lut[:, 1:].gather(1, self.owner.clamp(min=0)), self.owner)


def check_fits(method: Method, tokens: int, image: str) -> None:
    """UserError when the method's largest budget is more than the `tokens` visual tokens of `image`."""
    if tokens < max(method.budgets()):
        raise UserError(f"{method.spec()}: budget {max(method.budgets())} is more than the {tokens} visual tokens "
                        f"of {image}")


def check_videos(method: Method) -> None:
    """UserError when the method cannot reduce a prompt with videos. Frames are reduced one by one
    (`keep` tokens per frame) before the LLM, and inside it like any visual token; a video frame's
    pooled grid has no class-token attention and no tower pass of its own to reduce in."""
    if isinstance(method, TowerMethod):
        raise UserError(f"{method.name} reduces inside the vision tower; a video's frames are pooled after it, "
                        f"so it does not apply to prompts with videos (try divprune, cdpruner, mmtok, random or an "
                        f"in-LLM method: fastv, pdrop, sparsevlm, dart)")
    if method.needs_cls:
        raise UserError(f"{method.name} reads the vision tower's class-token attention, which a video's pooled "
                        f"frames do not have (try divprune, cdpruner, mmtok, random or an in-LLM method: fastv, "
                        f"pdrop, sparsevlm, dart)")


def _to_rows(sel: Selection, cand_valid: torch.Tensor, image_valid: torch.Tensor | None, starts: torch.Tensor) -> Selection:
    """A selection over images [N, P] (real tokens image_valid [N, P], None: all) -> over each row's
    visual tokens [B, V]; images of a row are consecutive, the image's first token at starts [N]."""
    b, v = cand_valid.shape
    real = image_valid if image_valid is not None else torch.ones_like(sel.keep)
    keep = torch.zeros(b, v, dtype=torch.bool, device=cand_valid.device)
    keep[cand_valid] = sel.keep[real]
    values = None
    if sel.values is not None:
        values = sel.values.new_zeros(b, v, sel.values.shape[-1])
        values[cand_valid] = sel.values[real]
    sizes = None
    if sel.sizes is not None:
        sizes = sel.sizes.new_ones(b, v)
        sizes[cand_valid] = sel.sizes[real]
    groups = None
    if sel.groups is not None:
        offset = starts[:, None].expand_as(real)[real]  # the image's start, per real token
        flat = sel.groups[real]
        groups = torch.full((b, v), -1, dtype=torch.long, device=keep.device)
        groups[cand_valid] = torch.where(flat >= 0, flat + offset, flat)
    return Selection(keep, values, groups, sizes)


def _check_tower(method: Method, cfg) -> None:
    """UserError when a method inside the vision tower cannot run on this model's tower."""
    if method.reads_cls and not cfg.vision.class_token:
        raise UserError(f"{method.name} reads the vision tower's class-token attention; this model's tower "
                        f"({cfg.vision.model_type}) has no class token (try divprune, cdpruner, mmtok or an in-LLM method)")
    if cfg.is_next:
        raise UserError(f"{method.name} reduces inside the vision tower, which encodes each LLaVA-NeXT tile on its "
                        f"own and cannot share the image's budget among them (try fastervlm, hired or globalcom2)")
    if not cfg.vision.class_token or cfg.vision_feature_select_strategy != "default":
        raise UserError(f"{method.name} reduces inside the vision tower, which needs a CLIP tower with the 'default' "
                        f"feature selection")


def make_reduction(spec, cfg) -> Reduction | None:
    """A Reduction for one generation from a spec string, a Method or a Reduction (used as is, e.g.
    to replay selections), checked against the model's LlavaConfig `cfg`; None stays None. On
    LLaVA-NeXT the budget is checked against the most tokens an image can give here, and against
    each image's own count when the images are known (Reduction.start)."""
    if spec is None or isinstance(spec, Reduction):
        return spec
    layers = cfg.text.num_hidden_layers
    method = parse_spec(spec).bind(layers)
    if isinstance(method, TowerMethod):
        _check_tower(method, cfg)
    if method.images == "single" and cfg.is_next:
        raise UserError(f"{method.name} needs the single square patch grid of LLaVA-1.5; LLaVA-NeXT images are "
                        f"tiled (try fastervlm, hired or globalcom2)")
    if method.images == "tiled" and not cfg.is_next:
        raise UserError(f"{method.name} shares the budget among the tiles of LLaVA-NeXT images; this LLaVA-1.5 "
                        f"model has none (fastervlm makes the same choice within one image)")
    if method.needs_cls and not cfg.vision.class_token:
        raise UserError(f"{method.name} reads the vision tower's class-token attention; this model's tower "
                        f"({cfg.vision.model_type}) has no class token (try divprune, cdpruner, mmtok or an in-LLM method)")
    early, depth = method.early_layer(), max(absolute_layer(i, cfg.vision.num_hidden_layers)
                                             for i in cfg.vision_feature_layers)
    if isinstance(early, int) and not 1 <= early <= depth:
        raise UserError(f"{method.spec()}: vision layer {early} is outside 1..{depth} (the blocks up to the "
                        f"selected features)")
    tokens = cfg.image_features_per_image
    if cfg.is_next:
        tokens = max(cfg.image_tokens(h, w) for h, w in cfg.image_grid_pinpoints)
    method.check(tokens, layers, cfg.vision.grid)
    if isinstance(method, TowerMethod):
        method.plan(depth, cfg.vision.num_patches)  # a UserError when it cannot reach keep by the selected block
    return Reduction(method, cfg.image_features_per_image)
