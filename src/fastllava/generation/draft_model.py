"""A smaller LLaVA-family model as the drafter of speculative decoding (`draft:model=DIR`).

The draft model keeps its own KV cache of the same sequences. It reads the prompt as the target
does, or with its visual tokens reduced (`reduce=SPEC`), or without the image at all (`image=0`):
MSD ("Speculative Decoding Reimagined for Multimodal Large Language Models", 2025) observes that
visual and text tokens call for different treatment in the draft; here the choice is the user's.
Its positions then run behind the target's by a fixed offset per row.

Each round the draft is fed what it has not seen (the token the target produced last, and the
last draft token when every draft was kept), then drafts k tokens greedily, one step each. After
the target's verify pass the draft keeps in its cache the drafts the target accepted and masks
the rest, so that both caches hold the same sequence again.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..ops import left_pad
from ..reduction.runtime import make_reduction
from .runner import Runner


class ModelDrafter:
    def __init__(self, runner: Runner, image: bool, reduce: str | None):
        """runner: the draft model's; image: whether the draft sees the prompt's images; reduce: a
        reduction spec applied to them in the draft's prefill (a fresh reduction each time)."""
        self.runner, self.image, self.reduce = runner, image, reduce
        self.cache = None
        self.offset: torch.Tensor | None = None  # [B] target position - draft position
        self.pending: list[list[int]] = []  # per row: accepted tokens the draft has not been fed
        self.fed = 0  # single-token draft steps written in the last round (their slots follow `start`)
        self.start: list[int] = []  # the draft cache's stage lengths before those steps

    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
             image_sizes: torch.Tensor | None, room: int, videos=None):
        """The draft's prefill of the target's prompts input_ids [B, T] (left-padded by
        attention_mask) as the draft reads them (without images and videos with image=0, else
        through its reduction), with room for `room` more tokens -> (its positions [B, T'], its cache)."""
        cfg = self.runner.model.cfg
        if not self.image:
            visual = {cfg.image_token_index, cfg.video_token_index}
            rows = [[t for t, m in zip(ids, mask) if m and t not in visual]
                    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
            input_ids, valid = left_pad(rows, cfg.text.pad_token_id or 0)
            attention_mask, pixel_values, image_sizes, videos = valid.long(), None, None, None
        elif videos is not None and not cfg.takes_videos:
            raise UserError("the draft model takes no videos; draft without them: draft:model=DIR,image=0")
        reduction = make_reduction(self.reduce, cfg) if self.reduce else None
        _, positions, cache = self.runner.prefill(input_ids, attention_mask, pixel_values, room, reduction,
                                                  image_sizes=image_sizes, pixel_values_videos=videos)
        return positions, cache

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                image_sizes: torch.Tensor | None, target_positions: torch.Tensor, room: int, videos=None) -> None:
        """Prefill the draft for one generation (see read); target_positions [B, T'] are the
        target's after its prefill."""
        positions, self.cache = self.read(input_ids, attention_mask, pixel_values, image_sizes, room, videos)
        self.offset = target_positions[:, -1] - positions[:, -1]  # [B]
        self.pending = [[] for _ in range(input_ids.shape[0])]

    def serve(self, rows: int, size: int) -> None:
        """Hold a lasting cache of `rows` rows and `size` slots for a server's continuous batching:
        prompts are read (`read`) and seated row by row (`seat`) as requests come."""
        self.cache = self.runner.lasting_cache(rows, size)
        self.offset = torch.zeros(rows, dtype=torch.long, device=self.runner.model.device)
        self.pending = [[] for _ in range(rows)]

    def seat(self, index: int, small, i: int, offset: int, reset: bool) -> None:
        """Copy row i of a prefilled draft cache `small` into row `index` of the lasting cache
        (emptied first with `reset`, as the target's is); offset: the target's last prompt
        position minus the draft's."""
        self.cache.insert_row(index, small, i, reset=reset)
        self.offset[index] = offset
        self.pending[index] = []

    def skip(self, index: int, token: int) -> None:
        """The target decoded `token` in row `index` without a round: feed it to the draft next time."""
        self.pending[index].append(token)

    def room(self, k: int) -> bool:
        """Whether the lasting cache has the slots of a round drafting k tokens."""
        return self.cache.length + max(len(p) for p in self.pending) + k <= self.cache.max_len

    def draft(self, cur: torch.Tensor, pos: torch.Tensor, k: int,
              live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k greedy draft tokens per row after `cur` [B] (at target positions pos [B]) -> (drafts
        [B, k], lengths [B]). live [B] (bool, None: all): rows that are not (a server's free rows)
        are fed `cur` alone and drop what was pending."""
        device = cur.device
        if live is not None:
            self.pending = [p if bool(a) else [] for p, a in zip(self.pending, live.tolist())]
        feed = [p + [int(c)] for p, c in zip(self.pending, cur.tolist())]
        width = max(len(f) for f in feed)
        tokens = torch.zeros(len(feed), width, dtype=torch.long)  # [B, W] right-aligned, padding first
        valid = torch.zeros(len(feed), width, dtype=torch.bool)
        for r, f in enumerate(feed):
            tokens[r, width - len(f):] = torch.tensor(f)
            valid[r, width - len(f):] = True
        base = (pos - self.offset).clamp(min=0)  # [B] the draft's position of `cur`
        at = (base[:, None] + torch.arange(1 - width, 1, device=device)).clamp(min=0)  # [B, W]: cur at the last
        tokens, valid = tokens.to(device), valid.to(device)
        tok = self.runner.multi_step(self.cache, tokens, at, valid=valid)[:, -1].argmax(-1)  # [B]
        drafted = [tok]
        self.start = [self.cache.lengths[f] for f in self.cache.stages]
        for i in range(1, k):
            tok = self.runner.multi_step(self.cache, tok[:, None], (base + i)[:, None])[:, 0].argmax(-1)
            drafted.append(tok)
        self.fed = k - 1
        return torch.stack(drafted, 1), torch.full_like(cur, k)

    def commit(self, drafts: torch.Tensor, kept: torch.Tensor) -> None:
        """After the verify pass kept[r] of row r's drafts [B, K]: keep those the draft was fed,
        mask the others, and remember a kept last draft (never fed) for the next round."""
        k = drafts.shape[1]
        keep = torch.arange(self.fed, device=kept.device)[None] < kept[:, None]  # [B, k - 1]
        for first, start in zip(self.cache.stages, self.start):
            self.cache.keep_only(first, start, keep)
        self.pending = [[int(drafts[r, k - 1])] if int(kept[r]) == k else [] for r in range(drafts.shape[0])]


def check_draft(target_cfg, draft_cfg, image: bool) -> None:
    """UserError unless the draft model can draft for the target: the same vocabulary and image
    token, and, when it sees the images, the same image processing and visual token counts."""
    if draft_cfg.text.vocab_size != target_cfg.text.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft_cfg.text.vocab_size} tokens) is not the target's "
                        f"({target_cfg.text.vocab_size}): a draft model needs the same tokenizer")
    if draft_cfg.image_token_index != target_cfg.image_token_index:
        raise UserError("the draft model's image token is not the target's: a draft model needs the same tokenizer")
    if not image:
        return
    same = (draft_cfg.is_next == target_cfg.is_next and draft_cfg.vision.image_size == target_cfg.vision.image_size
            and draft_cfg.image_features_per_image == target_cfg.image_features_per_image
            and getattr(draft_cfg, "image_grid_pinpoints", None) == getattr(target_cfg, "image_grid_pinpoints", None))
    if not same:
        raise UserError("the draft model processes images differently from the target (another family, image size "
                        "or visual token count); draft without the image: draft:model=DIR,image=0")
    if target_cfg.takes_videos and draft_cfg.takes_videos and draft_cfg.video_tokens(4) != target_cfg.video_tokens(4):
        raise UserError("the draft model turns a video into another number of tokens than the target; draft without "
                        "the images and videos: draft:model=DIR,image=0")
