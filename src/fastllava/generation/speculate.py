"""Speculative decoding: draft k tokens cheaply, check them all in one pass of the full model (the
runner's multi-token step), keep the longest prefix the model agrees with plus one token of its
own. The output is the model's own: greedy decoding gives exactly the tokens of plain greedy
decoding, and sampling keeps the model's distribution by the rejection rule of Leviathan et al.
("Fast Inference from Transformers via Speculative Decoding", 2023) and Chen et al. ("Accelerating
Large Language Model Decoding with Speculative Sampling", 2023). Drafts here are deterministic
(the draft's q is one-hot on its token), so a drafted token d is kept with probability p(d), and
on a rejection the replacement is drawn from p with d taken out, renormalised.

Drafters (`--speculate SPEC`):
  ngram[:n=3,k=4]     prompt lookup: the continuation of the latest earlier occurrence of the
                      last n tokens (fewer when n find none) in the prompt and the answer so far
                      (Saxena, "Prompt Lookup Decoding", 2023; vLLM's n-gram speculator).
  layerskip[:skip=A-B,k=4]
                      self-speculation (Zhang et al., "Draft & Verify: Lossless Large Language
                      Model Acceleration via Self-Speculative Decoding", ACL 2024): the same model
                      with the layers in `skip` left out drafts k tokens greedily, sharing the KV
                      cache of the layers it runs (the full model's pass then rewrites those
                      slots). Default skip: every other layer from a quarter of the depth to the
                      one before the last. The paper searches the skipped set by Bayesian
                      optimisation on a validation set; this default is a fixed rule.
  draft:model=DIR[,k=4,reduce=SPEC,image=0]
                      a smaller LLaVA-family checkpoint with the same tokenizer drafts k tokens
                      greedily from its own KV cache (see fastllava.generation.draft_model); it
                      reads the images (and videos) as the target does, through a reduction
                      (`reduce`), or not at all (`image=0`). Python API, CLI and the server.
  adaptive=1          (any) k shrinks by one after a round whose drafts were all rejected and
                      grows back by one after a round whose drafts were all kept, within 1..k.

Rows of a batch accept different numbers of tokens: each round every row writes 1 + k slots, the
rejected ones become invalid (masked), and the cache rewinds past the last slot any row keeps.
Quantized KV caches (KIVI, VidKV) hold a round's tokens unquantized (`cache.defer`), drop the
rejected ones and then quantize what is due (`cache.settle`), so the kept tokens are quantized in
the groups plain decoding gives them at batch 1; in a batch, the masked gaps that rows leave sit
inside their quantization groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import UserError
from ..kvcache import StaticKVCache
from ..reduction.registry import parse_spec
from ..reduction.runtime import Reduction
from ..specs import parse_options, split_spec
from .draft_model import ModelDrafter
from .runner import Runner, StepTimes, sync
from .sampling import SamplingParams, new_generator, probabilities, sample

KINDS = ("ngram", "layerskip", "draft")
MAX_K = 16


@dataclass(frozen=True)
class Speculation:
    kind: str  # "ngram", "layerskip" or "draft"
    k: int = 4  # tokens drafted per round (the most, with adaptive)
    n: int = 3  # ngram: tokens matched
    skip: tuple[int, ...] = ()  # layerskip: the layers the draft leaves out
    adaptive: bool = False
    model: str | None = None  # draft: the draft model's checkpoint folder
    image: bool = True  # draft: whether the draft model sees the images
    reduce: str | None = None  # draft: a token reduction for the draft model's images

    def spec(self) -> str:
        opts = {"ngram": f"n={self.n},k={self.k}",
                "layerskip": f"skip={'+'.join(map(str, self.skip))},k={self.k}",
                "draft": f"model={self.model},k={self.k}" + ("" if self.image else ",image=0")
                + (f",reduce={self.reduce}" if self.reduce else "")}[self.kind]
        return f"{self.kind}:{opts}" + (",adaptive=1" if self.adaptive else "")


@dataclass
class SpecStats:
    """Per row: tokens drafted, drafted tokens kept, verify rounds run, tokens generated (the first,
    from the prefill, included; tokens_per_step counts those after it)."""

    draft_tokens: list[int]
    accepted_tokens: list[int]
    rounds: list[int]
    generated: list[int] = field(default_factory=list)

    def row(self, r: int) -> dict:
        d, a, n = self.draft_tokens[r], self.accepted_tokens[r], self.rounds[r]
        return {"draft_tokens": d, "accepted_tokens": a, "acceptance": round(a / d, 4) if d else 0.0,
                "verify_steps": n, "tokens_per_step": round((self.generated[r] - 1) / n, 3) if n else 0.0}


def parse_speculate(spec: str | Speculation | None, num_layers: int | None) -> Speculation | None:
    """A speculation spec (see the module's docstring) checked against a model of `num_layers`
    language-model layers (None: its form only, before a model is loaded); None stays None."""
    if spec is None or isinstance(spec, Speculation):
        return spec
    name, rest = split_spec(spec)
    if name not in KINDS:
        raise UserError(f"unknown speculation {name!r} in {spec!r}; choose one of: {', '.join(KINDS)}")

    def message(problem: str, item: str, key: str, value: str | None) -> str:
        known = {"ngram": "n, k, adaptive", "layerskip": "skip, k, adaptive",
                 "draft": "model, k, reduce, image, adaptive"}[name]
        return {"unknown": f"{spec}: unknown option {key!r} (options of {name}: {known})",
                "missing": f"{spec}: {item!r} needs a value (key=value)",
                "invalid": f"{spec}: {key}={value} is not valid"}[problem]

    own = {"ngram": {"n": int}, "layerskip": {"skip": _layers}, "draft": {"model": str, "image": _flag, "reduce": str}}
    opts = parse_options(rest, {"k": int, "adaptive": _flag, **own[name]}, message)
    if name == "draft" and "model" not in opts:
        raise UserError(f"{spec}: a draft needs its model: draft:model=DIR")
    if opts.get("reduce") and opts.get("image") is False:
        raise UserError(f"{spec}: reduce applies to the draft's images, and image=0 leaves them out")
    if opts.get("reduce"):
        parse_spec(opts["reduce"])  # a bad reduction fails here, before any model loads
    if "skip" not in opts and name == "layerskip" and num_layers is not None:
        opts["skip"] = tuple(range(num_layers // 4 + 1, num_layers - 1, 2)) or ((1,) if num_layers > 2 else ())
    s = Speculation(name, **opts)
    if not 1 <= s.k <= MAX_K:
        raise UserError(f"{spec}: k must be in 1..{MAX_K}, got {s.k}")
    if not 1 <= s.n <= 64:
        raise UserError(f"{spec}: n must be in 1..64, got {s.n}")
    if name == "layerskip" and num_layers is not None:
        if not s.skip:
            raise UserError(f"{spec}: a {num_layers}-layer model has no layer to skip; use ngram")
        bad = [i for i in s.skip if not 0 < i < num_layers - 1]
        if bad or len(set(s.skip)) != len(s.skip):
            raise UserError(f"{spec}: skip must list distinct layers in 1..{num_layers - 2} (the first and the "
                            f"last always run), got {'+'.join(map(str, s.skip))}")
    return s


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


def _layers(value: str) -> tuple[int, ...]:
    """'3-6' (a range) or '2+5+7' (a list) -> layer indices."""
    if "-" in value:
        a, b = value.split("-", 1)
        return tuple(range(int(a), int(b) + 1))
    return tuple(int(v) for v in value.split("+"))


def ngram_draft(history: list[int], n: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last m tokens of history, for the
    largest m <= n that occurs earlier: the latest occurrence that is followed by k tokens, else the
    one followed by the most (in a repeating answer the latest is followed by one token only);
    [] when none occurs."""
    for m in range(min(n, len(history) - 1), 0, -1):
        tail, best = history[-m:], []
        for start in range(len(history) - m - 1, -1, -1):  # the latest occurrence first
            if history[start:start + m] == tail:
                follow = history[start + m:start + m + k]
                if len(follow) > len(best):
                    best = follow
                if len(best) == k:
                    break
        if best:
            return best
    return []


def accept(logits: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The verify pass's logits [B, K + 1, V] over drafts [B, K] (row r drafted lengths[r] of them)
    -> (drafted tokens kept per row [B], the token that follows them [B]). Greedy: the drafts that
    equal the model's argmax, then its argmax. Sampling: each draft d kept with probability p(d),
    the first rejected one replaced by a draw from p without d; all kept: a draw from the last p."""
    b, k1, _ = logits.shape
    k = k1 - 1
    live = torch.arange(k, device=logits.device)[None] < lengths[:, None]  # [B, K] real drafts
    rows = torch.arange(b, device=logits.device)
    if params.greedy:
        best = logits.argmax(-1)  # [B, K + 1]
        kept = ((best[:, :k] == drafts) & live).long().cumprod(1).sum(1)  # [B]
        return kept, best[rows, kept]
    probs = probabilities(logits, params)  # [B, K + 1, V]
    p_draft = probs[:, :k].gather(2, drafts[..., None])[..., 0]  # [B, K]
    u = torch.rand(p_draft.shape, generator=generator, device=logits.device)
    kept = ((u < p_draft) & live).long().cumprod(1).sum(1)  # [B]
    last = probs[rows, kept]  # [B, V] the distribution at the first rejected (or the bonus) position
    rejected = kept < lengths
    if bool(rejected.any()):
        d = drafts[rows, kept.clamp(max=k - 1)]  # [B] the rejected draft (where one was)
        taken = last.scatter(1, d[:, None], 0.0)
        last = torch.where(rejected[:, None], taken / taken.sum(1, keepdim=True).clamp(min=1e-30), last)
    return kept, torch.multinomial(last, 1, generator=generator)[:, 0]


@torch.inference_mode()
def speculative_steps(runner: Runner, spec: Speculation, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None, params: SamplingParams, eos_ids: list[int],
                      finished: torch.Tensor, times: StepTimes, stats: SpecStats,
                      reduction: Reduction | None = None, image_sizes: torch.Tensor | None = None,
                      drafter: ModelDrafter | None = None, pixel_values_videos=None) -> Iterator[list[list[int]]]:
    """As decode_steps, but yields each round's new tokens per row (lists of different lengths;
    [] for a finished row). `stats` gets each row's drafts, kept drafts and rounds. `drafter`: the
    draft model of a `draft` spec; `pixel_values_videos` as for decode_steps."""
    b, device = input_ids.shape[0], runner.model.device
    room = params.max_new_tokens * (spec.k + 1) if b > 1 else params.max_new_tokens + spec.k
    times.start = time.perf_counter()
    logits, positions, cache = runner.prefill(input_ids, attention_mask, pixel_values, room + spec.k + 1, reduction,
                                              times, image_sizes, pixel_values_videos)
    if (drafter is not None) != (spec.kind == "draft"):
        raise UserError("a draft speculation runs through Llava.generate, which loads its draft model")
    if drafter is not None:
        drafter.prefill(input_ids, attention_mask, pixel_values, image_sizes, positions, room + spec.k + 1,
                        pixel_values_videos)
    generator = new_generator(params, device)
    eos = set(eos_ids)
    history = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(),
                                                                             attention_mask.tolist())]
    stats.draft_tokens, stats.accepted_tokens, stats.rounds, stats.generated = [0] * b, [0] * b, [0] * b, [0] * b
    cur = sample(logits, params, generator)  # [B]
    times.first_token_s = time.perf_counter() - times.start
    pos = positions[:, -1] + 1  # [B] the position of `cur`
    k = spec.k
    out = [[int(t)] for t in cur.tolist()]
    while True:
        for r, new in enumerate(out):
            new = new[:params.max_new_tokens - stats.generated[r]] if not finished[r] else []
            out[r] = new
            stats.generated[r] += len(new)
            history[r] += new
            if any(t in eos for t in new) or stats.generated[r] >= params.max_new_tokens:
                finished[r] = True
        yield out
        if bool(finished.all()):
            break
        cache.defer = True  # a quantized cache holds this round's tokens unquantized until settle()
        if drafter is not None:
            drafts, lengths = drafter.draft(cur, pos, k)  # [B, K], [B]
        else:
            drafts, lengths = draft_tokens(runner, spec, cache, cur, pos, history, k)
        if drafts.shape[1] == 0:  # nothing to verify: a plain step
            logits = runner.multi_step(cache, cur[:, None], pos[:, None])[:, 0]
            nxt, kept = sample(logits, params, generator), torch.zeros_like(cur)
        else:
            tokens = torch.cat([cur[:, None], drafts], 1)  # [B, 1 + K]
            at = pos[:, None] + torch.arange(tokens.shape[1], device=device)  # [B, 1 + K]
            starts = [cache.lengths[f] for f in cache.stages]
            kept, nxt = accept(runner.multi_step(cache, tokens, at), drafts, lengths, params, generator)
            keep_accepted(cache, starts, kept, tokens.shape[1])
            if drafter is not None:
                drafter.commit(drafts, kept)
        cache.settle()
        out = []
        for r in range(b):
            if not finished[r]:
                n = int(kept[r])
                stats.rounds[r] += 1
                stats.draft_tokens[r] += int(lengths[r]) if drafts.shape[1] else 0
                stats.accepted_tokens[r] += n
                out.append(drafts[r, :n].tolist() + [int(nxt[r])])
            else:
                out.append([])
        if drafts.shape[1]:
            k = adapt_k(spec, k, kept[~finished], lengths[~finished])
        pos, cur = pos + kept + 1, nxt
    sync(device)
    times.end_s = time.perf_counter() - times.start


def keep_accepted(cache: StaticKVCache, starts: list[int], kept: torch.Tensor, width: int) -> None:
    """After a verify pass of `width` = 1 + K tokens written from starts[s] in each cache stage:
    keep per row its input token and its kept[r] accepted drafts, mask the rest, rewind."""
    keep = torch.arange(width, device=kept.device)[None] <= kept[:, None]  # [B, 1 + K]
    for first, start in zip(cache.stages, starts):
        cache.keep_only(first, start, keep)


def adapt_k(spec: Speculation, k: int, kept: torch.Tensor, lengths: torch.Tensor) -> int:
    """The next round's k (spec.adaptive): one less after a round whose drafts (lengths [R] per live
    row) were all rejected, one more (up to spec.k) after one whose drafts were all kept."""
    if not spec.adaptive:
        return k
    if bool((kept == 0).all()):
        return max(1, k - 1)
    if bool((kept == lengths).all()):
        return min(spec.k, k + 1)
    return k


def draft_tokens(runner: Runner, spec: Speculation, cache: StaticKVCache, cur: torch.Tensor, pos: torch.Tensor,
           history: list[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's draft of up to k tokens after `cur` (at positions pos [B]) -> (drafts [B, K],
    their lengths [B]); K = 0 when no row has one. Rows with fewer are padded (never kept)."""
    device = cur.device
    if spec.kind == "ngram":
        found = [ngram_draft(h, spec.n, k) for h in history]
        width = max(len(f) for f in found)
        drafts = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=device)
        return drafts.view(len(found), width), torch.tensor([len(f) for f in found], device=device)
    starts = [cache.lengths[f] for f in cache.stages]
    skip, tok, drafted = frozenset(spec.skip), cur, []
    for i in range(k):  # the draft model: this model without the skipped layers, greedy
        tok = runner.multi_step(cache, tok[:, None], (pos + i)[:, None], skip)[:, 0].argmax(-1)
        drafted.append(tok)
    for first, start in zip(cache.stages, starts):
        cache.rewind(first, start)  # the verify pass writes these slots again, with every layer
    return torch.stack(drafted, 1), torch.full_like(cur, k)
