"""What a reduction method is and what it sees.

A method is a small typed dataclass. Methods that act *before* the language model (`where =
"vision"`) get a VisionContext per batch of images; methods that act *inside* it (`where =
"llm"`) get a LayerContext after each of their cut layers. Both answer with a Selection: a mask
of the candidate visual tokens to keep and, for methods that merge, the merged states that the
kept tokens carry from then on.

LLaVA-NeXT images are a base thumbnail plus tiles: a VisionContext then holds one row per image
padded to the longest (`valid`), and `part` says which partition (base image or tile) each token
comes from. Methods before the LLM select per partition through `VisionContext.top`: the budget is
shared among the base image and the tiles (in proportion to their token counts unless the method
weighs them), each partition keeps its best tokens, and the `image_newline` tokens come last (kept
only when the budget exceeds the image's patch tokens). Methods inside the LLM treat every visual
token of a row alike, newlines included.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Callable, ClassVar

import torch

from ..errors import UserError


@dataclass
class Selection:
    keep: torch.Tensor  # [N, P] bool: candidates kept
    values: torch.Tensor | None = None  # [N, P, D]: states of the kept candidates (merges), or None
    groups: torch.Tensor | None = None  # [N, P] long: the kept candidate each one merged into, -1 dropped
    # [N, P] float: the original tokens each kept candidate stands for. When given, every later
    # layer adds log(size) to the attention logits of its key (proportional attention), so a
    # merged token draws the attention its whole group would.
    sizes: torch.Tensor | None = None


@dataclass
class VisionContext:
    """Hook (a), before the language model; one row per image."""

    vision: torch.Tensor  # [N, P, Dv] selected vision features, before the projector
    features: torch.Tensor  # [N, P, D] projected features (what the LLM would receive)
    cls_attention: torch.Tensor | None  # [N, P] class-token attention at the selected layer (heads averaged)
    keys: torch.Tensor | None  # [N, P, Dv] keys of that layer's attention
    text: torch.Tensor  # [N, T, D] embeddings of the prompt each image belongs to
    text_valid: torch.Tensor  # [N, T] real text tokens of that prompt
    grid: int  # patches per side (P = grid**2, plus 1 with the "full" strategy's class token)
    budget: int  # tokens to keep per image
    project: Callable[[torch.Tensor], torch.Tensor]  # [N, k, Dv] -> [N, k, D]
    # LLaVA-NeXT only (None for LLaVA-1.5: one partition, every token real):
    valid: torch.Tensor | None = None  # [N, P] real tokens (images differ in length; rows are padded)
    part: torch.Tensor | None = None  # [N, P] long: 0 the base image (its grid**2 tokens first), 1.. the
    #   tiles row by row, -1 an image_newline or padding
    where: torch.Tensor | None = None  # [N, P, 2] (y, x) in [0, 1]: centre of each token's patch in the image
    early_attention: torch.Tensor | None = None  # [N, P] class-token attention in Method.early_layer()
    # TowerMethod only (what the tower left; see LlavaModel.encode_planned):
    tower_keep: torch.Tensor | None = None  # [N, P] bool: the tokens left after the tower's reduction
    tower_groups: torch.Tensor | None = None  # [N, P] long: the kept patch each patch belongs to, -1 dropped
    tower_sizes: torch.Tensor | None = None  # [N, P] float: patches each kept one stands for

    @property
    def counts(self) -> torch.Tensor:
        """[N] visual tokens of each image."""
        n, p = self.features.shape[:2]
        return self.valid.sum(1) if self.valid is not None else torch.full((n,), p, device=self.features.device)

    @property
    def patches(self) -> torch.Tensor:
        """[N, P] tokens that come from the vision tower (not newlines, not padding)."""
        if self.part is None:
            return torch.ones(self.features.shape[:2], dtype=torch.bool, device=self.features.device)
        return self.valid & (self.part >= 0)

    def per_part(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P] -> [N, S] its sums over each partition's patches (S: the most partitions of an image)."""
        x = torch.where(self.patches, x, 0).double()
        return x.new_zeros(x.shape[0], int(self.part.max()) + 1).scatter_add_(1, self.part.clamp(min=0), x)

    def top(self, scores: torch.Tensor, budget: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Keep mask [N, P] of `budget` tokens per image by scores [N, P]; on tiled images shared
        among the partitions in proportion to weights [N, S] (default: their token counts)."""
        if self.part is None:
            return top_mask(scores, torch.ones_like(scores, dtype=torch.bool), budget)
        weights = self.per_part(torch.ones_like(scores)) if weights is None else weights
        return share(scores, self.part, self.valid, budget, weights)


@dataclass
class LayerContext:
    """Hook (b), after layer `layer` of the language model; candidates are the visual tokens of
    each row, gathered into [B, N] (rows with fewer are padded, `cand_valid` False there)."""

    layer: int  # index of the layer just run
    cut: int  # which of the method's cuts this is (0, 1, ...)
    hidden: torch.Tensor  # [B, T, D] hidden states after the layer
    probs: torch.Tensor | None  # [B, H, T, T] that layer's attention (float32), if the method needs it;
    #   [B, H, 1, T], the last query's only, where its attention_queries() is "last"
    keys: torch.Tensor  # [B, Hkv, T, Dh] that layer's keys (after RoPE)
    valid: torch.Tensor  # [B, T] real tokens
    visual: torch.Tensor  # [B, T] visual tokens (a subset of valid)
    cand: torch.Tensor  # [B, N] long: index in T of each candidate
    cand_valid: torch.Tensor  # [B, N]
    budget: torch.Tensor  # [B] long: candidates to keep per row
    sizes: torch.Tensor  # [B, T] float: original tokens each token stands for (1 unless merged at an earlier cut)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] -> the candidates' rows [B, N, ...]."""
        return take(x, self.cand)

    def last_attention(self) -> torch.Tensor:
        """[B, T]: the attention the last prompt token pays each token, averaged over heads (with
        left padding the last token of every row is real)."""
        return self.probs[:, :, -1].mean(1)

    @property
    def text(self) -> torch.Tensor:
        """[B, T] real tokens that are not visual."""
        return self.valid & ~self.visual


@dataclass
class Method:
    """Base of all methods. Subclasses are dataclasses whose fields are the spec's parameters;
    `keep` is the number of visual tokens kept per image."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    where: ClassVar[str] = "vision"  # "vision" (before the LLM) or "llm" (inside it)
    needs_cls: ClassVar[bool] = False  # VisionContext.cls_attention / keys
    needs_attention: ClassVar[bool] = False  # LayerContext.probs
    images: ClassVar[str] = "any"  # "any", "single" (LLaVA-1.5 only) or "tiled" (LLaVA-NeXT only)
    merge_modes: ClassVar[tuple[str, ...]] = ()  # values of its `merge` field (methods that have one)
    empty_lists: ClassVar[dict[str, str]] = {}  # what an empty list parameter means, for the listing (default "auto")

    keep: int = 64

    def spec(self) -> str:
        """The full spec, which parse_spec reads back to this method (an empty list parameter,
        which means its default, is left out: `layers=` would not parse)."""
        params = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)
                          if getattr(self, f.name) != [])
        return f"{self.name}:{params}" if params else self.name

    def label(self) -> str:
        """The spec without `keep` and without the parameters left at their defaults: 'fastv:layer=1'."""
        changed = [f for f in fields(self) if f.name != "keep" and getattr(self, f.name) != field_default(f)]
        return self.name + (":" + ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in changed) if changed else "")

    def budgets(self) -> list[int]:
        """Visual tokens per image after each cut (for a method before the LLM: first `keep`, then
        after each of its cuts inside the LLM, if it has any)."""
        return [self.keep]

    def cuts(self) -> list[int]:
        """Indices of the LLM layers after which the method cuts (llm methods; a method before the
        LLM may cut inside it as well, its select() then also gets LayerContexts)."""
        return []

    def attention_queries(self) -> str:
        """Whose attention LayerContext.probs holds when the method needs_attention: "all" queries'
        [B, H, T, S], or the "last" prompt token's alone [B, H, 1, S] (a row that fused attention
        leaves cheap to compute beside it)."""
        return "all"

    def early_layer(self):
        """A vision block (1-based) whose class-token attention the method needs besides that of the
        selected layer (VisionContext.early_attention), or None."""
        return None

    def bind(self, num_layers: int) -> "Method":
        """The method with defaults that depend on the model's depth filled in."""
        return self

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        """Raise UserError when the method cannot run on a model with `tokens` visual tokens per
        image (a grid x grid patch grid) and `num_layers` decoder layers."""
        if self.merge_modes and getattr(self, "merge") not in self.merge_modes:
            raise UserError(f"{self.spec()}: merge must be one of {', '.join(self.merge_modes)}")
        for b in self.budgets():
            if b < 1 or b > tokens:
                raise UserError(f"{self.spec()}: budget {b} is outside 1..{tokens} (the visual tokens per image)")
        for c in self.cuts():
            if not 0 <= c < num_layers - 1:
                raise UserError(f"{self.spec()}: layer {c + 1} is outside 1..{num_layers - 1} for a "
                                f"{num_layers}-layer language model")

    def select(self, ctx) -> Selection:
        raise NotImplementedError


@dataclass
class VisionMethod(Method):
    """A method before the language model. `positions=original` (the default) leaves each kept
    token at its place in the unreduced prompt (RoPE positions with gaps where tokens were
    dropped); `positions=compact` numbers the shortened prompt 0, 1, 2, ... as the papers' code
    does, which feeds the language model the shorter sequence as if it were the whole prompt."""

    POSITIONS: ClassVar[tuple[str, ...]] = ("original", "compact")

    positions: str = "original"

    def check(self, tokens: int, num_layers: int, grid: int) -> None:
        if self.positions not in self.POSITIONS:
            raise UserError(f"{self.spec()}: positions must be one of {', '.join(self.POSITIONS)}")
        super().check(tokens, num_layers, grid)


@dataclass
class TowerMethod(VisionMethod):
    """A method that reduces the tokens inside the vision tower (LLaVA-1.5's CLIP tower): the tower
    runs its blocks under the method's plan(depth) (see models.vision.TowerPlan), which may drop or
    merge tokens after any block up to `depth`, the block giving the selected features, and ends with
    exactly `keep` patches per image. Only the tokens left are projected; select() then hands them to
    the language model (at their original places, see VisionMethod.positions), with the sizes of
    merged tokens as proportional attention in the LLM when `llm_sizes()` says so."""

    needs_cls: ClassVar[bool] = True  # refused on towers without a class token (SigLIP)
    images: ClassVar[str] = "single"
    reads_cls: ClassVar[bool] = False  # whether its plan reads the class token (no tower without one qualifies)

    def plan(self, depth: int, patches: int):
        """A fresh TowerPlan for one tower run whose selected features come out of block `depth`, on
        images of `patches` patch tokens (UserError when the method cannot reach `keep` there)."""
        raise NotImplementedError

    def llm_sizes(self) -> bool:
        """Whether merged tokens draw proportional attention in the language model too."""
        return False

    def select(self, ctx: VisionContext) -> Selection:
        sizes = ctx.tower_sizes if self.llm_sizes() else None
        return Selection(ctx.tower_keep, groups=ctx.tower_groups, sizes=sizes)


def field_default(f):
    """A dataclass field's default value (made by its factory, if it has one)."""
    return f.default_factory() if f.default is MISSING else f.default


def _fmt(value) -> str:
    return "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def top_mask(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor | int) -> torch.Tensor:
    """The `budget` highest scores of each row among the valid entries (ties: lower index first).
    scores, valid [B, N]; budget int or [B] -> keep mask [B, N]."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [B, N]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    budget = torch.as_tensor(budget, device=scores.device).reshape(-1, 1)
    return (rank < budget) & valid


def mean_into(states: torch.Tensor, assign: torch.Tensor, slots: int,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Average rows of states [N, M, D] into `slots` groups by assign [N, M] (values in
    0..slots-1, or -1 for none), weighted by weights [N, M] (default 1) -> [N, slots, D] (zeros
    for an empty group)."""
    n, _, d = states.shape
    w = (assign >= 0).to(states.dtype) * (1 if weights is None else weights.to(states.dtype))  # [N, M]
    idx = assign.clamp(min=0)[..., None].expand(-1, -1, d)
    sums = states.new_zeros(n, slots, d).scatter_add_(1, idx, states * w[..., None])
    totals = states.new_zeros(n, slots).scatter_add_(1, assign.clamp(min=0), w)
    return sums / totals.masked_fill(totals == 0, 1)[..., None]


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] gathered along T by index [B, T'] -> [B, T', ...]."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def candidates(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, T] -> (index [B, N] of each row's True entries in order (0 where padded), valid [B, N])."""
    counts = mask.sum(1)
    width = max(int(counts.max()), 1)
    rows, cols = mask.nonzero(as_tuple=True)
    rank = (mask.long().cumsum(1) - 1)[rows, cols]
    index = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    index[rows, rank] = cols
    return index, torch.arange(width, device=mask.device)[None] < counts[:, None]


def share(scores: torch.Tensor, part: torch.Tensor, valid: torch.Tensor, budget: int,
          weights: torch.Tensor) -> torch.Tensor:
    """Keep `budget` tokens per row, shared among partitions by the Sainte-Lague divisor method:
    the t-th best token (t = 0, 1, ...) of partition p gets priority (t + 0.5) / weights[p] and the
    lowest priorities are kept, so partition p keeps about budget * w_p / sum(w) of its best tokens
    (never more than it has; what it cannot take goes to the others). Tokens outside every partition
    (part -1) come after all others, in order. Ties: lower index first.
    scores, part, valid [N, P]; weights [N, S] > 0 (S partitions) -> keep [N, P]."""
    n, p = scores.shape
    inside = valid & (part >= 0)
    pid = part.clamp(min=0)
    pos = torch.arange(p, device=scores.device).expand(n, -1)
    order = scores.float().masked_fill(~inside, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    order = order.gather(1, part.gather(1, order).argsort(dim=-1, stable=True))  # by partition, best first
    grouped = part.gather(1, order)
    first = torch.ones_like(inside)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, pos - torch.where(first, pos, 0).cummax(1).values)  # [N, P]
    priority = (rank + 0.5).double() / weights.double().clamp(min=1e-30).gather(1, pid)
    last = priority.masked_fill(~inside, 0).amax(1, keepdim=True) + 1 + pos  # after every partition token
    return top_mask(-torch.where(inside, priority, last), valid, budget)
