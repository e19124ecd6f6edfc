"""Continuous batching over one StaticKVCache of `max_batch_size` rows.

Requests admitted together are prefilled as one left-padded batch (as `Llava.generate` does
it) and their cache rows are copied into free rows of the shared cache, right-aligned at the
shared length (see `StaticKVCache.insert_row`). Each decode step then runs every active row
together, each at its own position, through the runner's decode step (`Runner.step`: in
the static and compiled modes a fixed-shape step over the first slots in use); a row that
finishes (EOS, stop string, max_tokens, client gone) frees its slot for the next waiting request.
A request is admitted only while every active row still has room to finish; otherwise it waits
until rows drain (the cache starts again at slot 0 when empty).
All model work happens on one thread; results go back through each job's `emit` callback.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import Llava
from ..errors import UserError
from ..generation import SamplingParams, TextState, new_generator, sample, step_span
from ..generation.draft_model import ModelDrafter
from ..generation.speculate import Speculation, accept, adapt_k, draft_tokens, keep_accepted
from ..generation.step import Step
from ..ops import left_pad
from ..reduction.runtime import make_reduction
from .errors import APIError
from .metrics import Metrics
from .prefix_cache import PrefixCache, row_kv


@dataclass
class Job:
    ids: list[int]  # prompt token ids, image tokens expanded
    pixel_values: torch.Tensor | None  # [N, 3, H, W]; LLaVA-NeXT: every image's tiles one after another [ΣP, 3, H, W]
    image_sizes: torch.Tensor | None  # [N, 2] (height, width) of LLaVA-NeXT images, else None
    params: SamplingParams
    stream: bool  # emit text deltas as they are produced
    emit: Callable[[tuple], None]  # ("delta", str) | ("done", Finish) | ("error", APIError)
    reduce: str | None = None  # a token-reduction spec, applied at prefill
    keys: list | None = None  # what identifies each prompt token, for the prefix cache (prefix_cache.token_keys)
    ignore_eos: bool = False  # run to max_new_tokens (load tests)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)  # for the time-to-first-token metric
    videos: list[torch.Tensor] | None = None  # each video's frames [T_i, 3, H, W] (OneVision, NeXT-Video), in order


@dataclass
class Finish:
    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int  # EOS included, as usage counts it
    visual_tokens: list[int] | None = None  # with a reduction: entering the LLM, then after each cut
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class Busy(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Row:
    """One sequence being decoded in row `index` of the shared cache."""

    def __init__(self, index: int, job: Job, generator: torch.Generator | None, text: TextState, pos: int,
                 visual_tokens: list[int] | None, cached_tokens: int):
        self.index, self.job, self.generator, self.text = index, job, generator, text
        self.pos = pos  # position of the last token fed to the model
        self.visual_tokens = visual_tokens
        self.cached_tokens = cached_tokens
        self.last = 0  # the last sampled token
        self.first_at = time.perf_counter()  # when the first token was sampled

    def push(self, tok: int) -> bool:
        """Take a sampled token; emit what text it adds; True when the sequence is finished."""
        self.last = tok
        delta, done = self.text.push(tok)
        if delta:
            self.job.emit(("delta", delta))
        return done

    def finish(self) -> Finish:
        text, held = self.text.finish()
        if held:
            self.job.emit(("delta", held))  # what was held back (an incomplete character at the end)
        return Finish(text, self.text.reason, self.text.count, self.visual_tokens, self.cached_tokens)


class Scheduler:
    def __init__(self, llava: Llava, max_batch_size: int, max_queue: int, max_len: int,
                 speculate: Speculation | None = None, prefix_cache: PrefixCache | None = None,
                 drafter: ModelDrafter | None = None):
        """max_len: the context in positions (prompt + answer). The shared cache has that many
        slots plus the fixed-shape prefill's padding, so that every request that fits the context
        can be admitted (admissible). `speculate`: speculative decoding for every row (greedy rows
        get exactly their plain tokens, sampled rows their distribution). `prefix_cache`: prompts'
        keys and values kept for later prompts that begin the same way (jobs with `keys`).
        `drafter`: the draft model of a `draft` speculation, with a lasting cache whose rows follow
        the shared cache's (each prompt read by the draft too when its job is seated)."""
        self.llava, self.model = llava, llava.model
        self.prefix = prefix_cache
        self.spec = speculate
        self.spec_k = speculate.k if speculate is not None else 0  # adaptive k, shared by the rows
        self.runner = llava.runner
        self.context = max_len
        self.cache = self.runner.lasting_cache(max_batch_size, max_len + self.runner.prompt_slots(1) - 1)
        self.drafter = drafter
        if drafter is not None:  # its rounds write at most the target's slots, plus a round's drafts
            drafter.serve(max_batch_size, self.cache.max_len + speculate.k + 1)
        self._decoder, self._decoder_key = None, None  # the decode step, and the cache layout it was made for
        self.rows: list[_Row | None] = [None] * max_batch_size
        self.waiting: deque[Job] = deque()
        self.max_queue = max_queue
        self.eos = set(llava.config.text.eos_token_id)
        self.finished = self.cancelled = 0  # requests answered / dropped because the client left
        self.metrics = Metrics()
        self.restarts = 0  # times the cache was empty and started again at slot 0
        self.drafted = self.accepted = self.rounds = 0  # speculation: tokens drafted, drafts kept, verify rounds
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fastllava-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def check_room(self) -> None:
        """Raise Busy (429 when the queue is full, 503 when shutting down) if a job would be refused."""
        if self._stopping:
            raise Busy(503, "the server is shutting down")
        if len(self.waiting) >= self.max_queue:
            raise Busy(429, f"the server is busy ({len(self.waiting)} requests waiting); retry later")

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Busy (see check_room)."""
        with self._cond:
            self.check_room()
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away); its row is freed before the next step."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    def slots_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Cache slots a request needs: its prompt as the prefill lays it out (padded to a bucket
        with fixed shapes), then max_new_tokens - 1 (the first token comes from the prefill)."""
        return self.runner.prompt_slots(prompt_tokens) + max_new_tokens - 1

    def admissible(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request can ever be admitted (alone, into the empty cache): the same
        arithmetic as admission. Every request within the context is."""
        return self.slots_needed(prompt_tokens, max_new_tokens) <= self.cache.max_len

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def cache_counters(self) -> dict[str, tuple[str, float]]:
        """Prometheus counters of the encoder and prefix caches (absent when a cache is off) and of
        speculative decoding (absent without it)."""
        out = {}
        if self.spec is not None:
            out["fastllava_speculative_rounds_total"] = ("speculative rounds (one verify pass each)", self.rounds)
            out["fastllava_speculative_draft_tokens_total"] = ("tokens drafted for the rows decoding", self.drafted)
            out["fastllava_speculative_accepted_tokens_total"] = ("drafted tokens the model kept", self.accepted)
        enc = self.runner.encoder_cache
        if enc is not None:
            out["fastllava_encoder_cache_hits_total"] = ("images (or tiles, frames) taken from the encoder cache", enc.hits)
            out["fastllava_encoder_cache_misses_total"] = ("images (or tiles, frames) encoded", enc.misses)
        if self.prefix is not None:
            out["fastllava_prefix_cache_hits_total"] = ("prompts that began as a cached one", self.prefix.hits)
            out["fastllava_prefix_cache_misses_total"] = ("prompts looked up and not found", self.prefix.misses)
            out["fastllava_prefix_cache_cached_tokens_total"] = ("prompt tokens taken from the prefix cache",
                                                                 self.prefix.cached_tokens)
            out["fastllava_prefix_cache_evictions_total"] = ("prefix cache entries evicted", self.prefix.evictions)
        return out

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Prometheus gauges read now (metrics.Metrics.render)."""
        out = {"fastllava_queue_length": ("requests waiting for a row", len(self.waiting)),
                "fastllava_running_rows": ("rows being decoded", len(self._active())),
                "fastllava_kv_cache_slots_used": ("slots of the shared KV cache in use", self.cache.length),
                "fastllava_kv_cache_slots": ("slots of the shared KV cache", self.cache.max_len)}
        if self.runner.encoder_cache is not None:
            out["fastllava_encoder_cache_bytes"] = ("bytes the encoder cache holds", self.runner.encoder_cache.nbytes)
        if self.prefix is not None:
            out["fastllava_prefix_cache_bytes"] = ("bytes the prefix cache holds", self.prefix.nbytes)
        return out

    def counts(self) -> dict:
        return {"active": len(self._active()), "waiting": len(self.waiting), "max_batch_size": len(self.rows),
                "finished": self.finished, "cancelled": self.cancelled, "cache_restarts": self.restarts}

    # ---- the model thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self._active():
                        self._cond.wait()
                    if self._stopping:
                        break
                for r in self._active():
                    if r.job.cancelled:
                        self.rows[r.index] = None
                        self.cancelled += 1
                self._admit()
                if self._active():
                    self._guarded(self._step)
        for job in list(self.waiting) + [r.job for r in self._active()]:
            job.emit(("error", APIError(503, "the server is shutting down", None, "shutting_down")))

    def _active(self) -> list[_Row]:
        return [r for r in self.rows if r is not None]

    def _admit(self) -> None:
        """Take waiting jobs (in order, with the same reduction) while rows are free and every
        row, old and new, still has room to finish; prefill them together."""
        group: list[Job] = []
        with self._cond:
            while self.waiting and len(group) < self.rows.count(None):
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    self.cancelled += 1
                    continue
                if not self.admissible(len(job.ids), job.params.max_new_tokens):  # never: refused, not waiting
                    self.waiting.popleft()
                    job.emit(("error", APIError(400, f"the request needs {self.slots_needed(len(job.ids), job.params.max_new_tokens)} "
                                                f"cache slots, over the {self.cache.max_len} there are", "max_tokens",
                                                "context_length_exceeded")))
                    continue
                if (group and job.reduce != group[0].reduce) or not self._fits(group + [job]):
                    break
                group.append(self.waiting.popleft())
        if group:
            self._guarded(self._start, group)

    def _fits(self, jobs: list[Job]) -> bool:
        """Whether, with these prompts inserted now, every row still has the slots to finish."""
        active = self._active()
        end = max([self.cache.length if active else 0] + [self.runner.prompt_slots(len(j.ids)) for j in jobs])
        need = [r.job.params.max_new_tokens - r.text.count for r in active] + [j.params.max_new_tokens - 1 for j in jobs]
        return end + max(need) <= self.cache.max_len  # with no active row: slots_needed of each job

    def _start(self, jobs: list[Job]) -> None:
        """Prefill the jobs as one left-padded batch (as `Llava.generate` does), sample each
        one's first token with its own parameters, copy their cache rows into free rows. A job
        whose prompt begins as a cached one does is prefilled alone, from the end of that prefix.
        A group whose prefill fails is tried again job by job, so that only the job at fault is
        answered with the error (400 for a user error, 500 otherwise)."""
        if self.prefix is not None and jobs[0].reduce is None:
            rest = []
            for job in jobs:
                entry, reuse = self.prefix.lookup(job.keys) if job.keys is not None else (None, 0)
                if entry is None:
                    rest.append(job)
                else:
                    self._start_cached(job, entry.k[:, :, :reuse], entry.v[:, :, :reuse])
            if not rest:
                return
            jobs = rest
        ids, valid = left_pad([j.ids for j in jobs], self.llava.config.text.pad_token_id or 0)  # [B', T]
        pixels = _cat([j.pixel_values for j in jobs])  # [N, 3, H, W] or NeXT tiles [ΣP, 3, H, W], row by row
        sizes = _cat([j.image_sizes for j in jobs])  # [N, 2] (LLaVA-NeXT) or None
        videos = _videos([v for j in jobs for v in j.videos or []])
        try:
            reduction = make_reduction(jobs[0].reduce, self.llava.config)
            logits, positions, small = self.runner.prefill(ids, valid, pixels, 0, reduction, image_sizes=sizes,
                                                           pixel_values_videos=videos)  # [B', V], [B', T']
            draft = self.drafter.read(ids, valid, pixels, sizes, 0, videos) if self.drafter is not None else None
        except Exception as e:  # noqa: BLE001 - contained: see the docstring
            if len(jobs) > 1:
                for job in jobs:
                    self._start([job])
                return
            self._fail(jobs[0], e)
            return
        for i, job in enumerate(jobs):
            kept = [int(c[i]) for c in reduction.counts] if reduction is not None else None
            if self._seat(job, logits[i:i + 1], int(positions[i, -1]), small, i, kept, 0, draft) and self._shared(job):
                slots = small.valid[0, i, :small.length].nonzero()[:, 0]  # the row's real prompt slots
                self.prefix.store(job.keys, *row_kv(small, i, slots))

    def _shared(self, job: Job) -> bool:
        """Whether a job's prompt goes to the prefix cache (see prefix_cache: not with a reduction)."""
        return self.prefix is not None and job.keys is not None and job.reduce is None

    def _start_cached(self, job: Job, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill one job whose first tokens' keys and values k, v [L, Hkv, M, Dh] are cached."""
        try:
            ids = torch.tensor([job.ids], dtype=torch.long)  # [1, T]
            logits, positions, small = self.runner.prefill_cached(k, v, ids, job.pixel_values, 0, job.image_sizes,
                                                                  _videos(job.videos or []))
            draft = None
            if self.drafter is not None:  # the draft reads the whole prompt
                draft = self.drafter.read(ids, torch.ones_like(ids), job.pixel_values, job.image_sizes, 0,
                                          _videos(job.videos or []))
        except Exception as e:  # noqa: BLE001 - this job alone fails
            self._fail(job, e)
            return
        if self._seat(job, logits, int(positions[0, -1]), small, 0, None, k.shape[2], draft):
            self.prefix.store(job.keys, *row_kv(small, 0, torch.arange(len(job.ids), device=small.valid.device)))

    def _seat(self, job: Job, logits: torch.Tensor, pos: int, small, i: int, kept: list[int] | None,
              cached: int, draft=None) -> bool:
        """Sample a prefilled job's first token from its logits [1, V], copy row i of its cache
        `small` into a free row of the shared cache (emptied first when no row is active) and
        start decoding it; False when its sampling fails (the job is answered with the error).
        draft: the draft model's (positions, cache) of the same prompts (ModelDrafter.read), whose
        row i goes into the same row of the draft's cache."""
        try:
            p, generator = job.params, new_generator(job.params, self.model.device)
            first = int(sample(logits, p, generator)[0])
        except Exception as e:  # noqa: BLE001 - this job alone fails
            self._fail(job, e)
            return False
        reset = not self._active()
        self.restarts += reset
        index = self.rows.index(None)
        self.cache.insert_row(index, small, i, reset=reset)
        if draft is not None:
            self.drafter.seat(index, draft[1], i, pos - int(draft[0][i, -1]), reset)
        text = TextState(self.llava.prompts.decode, set() if job.ignore_eos else self.eos, p.stop,
                         p.max_new_tokens, job.stream)
        row = self.rows[index] = _Row(index, job, generator, text, pos, kept, cached)
        self.metrics.ttft.observe(row.first_at - job.submitted)
        self.metrics.prompt_tokens += len(job.ids)
        self._push(row, first)
        return True

    def _push(self, row: _Row, token: int) -> None:
        """Give a row its next token; finish it when done; a failure (text decoding, the client's
        callback) fails this row alone."""
        try:
            if row.push(token):
                self._finish(row)
        except Exception as e:  # noqa: BLE001
            self.rows[row.index] = None
            self._fail(row.job, e)

    def _fail(self, job: Job, e: Exception) -> None:
        """Answer one job with its error: 400 for a user error, else 500 (with the traceback logged)."""
        if isinstance(e, UserError):
            job.emit(("error", APIError(400, str(e), "messages", "invalid_prompt")))
            return
        traceback.print_exception(e, file=sys.stderr)
        job.emit(("error", APIError(500, "internal error while generating", None, "internal_error")))

    def _step(self) -> None:
        """One decode step for all rows (a speculative round where there is room for it)."""
        active = self._active()
        need = max(r.job.params.max_new_tokens - r.text.count for r in active)
        # a round writes 1 + k slots: speculate only while every row could still finish plainly after it
        room = self.drafter is None or self.drafter.room(self.spec_k)
        if self.spec is not None and self.cache.length + self.spec_k + 1 + need <= self.cache.max_len and room:
            if self._speculative_step(active):
                return
        self._plain_step()

    def _plain_step(self) -> None:
        """One decode step for all rows. A free row computes on a dummy token that it attends to
        (its slots are made invalid when a request takes the row): a row with no key to attend
        to would be all masked, which some attention kernels answer with NaN, and a NaN value
        under a masked slot would poison the next request of that row."""
        device, b = self.model.device, len(self.rows)
        active = self._active()
        tokens = torch.zeros(b, dtype=torch.long)  # [B]
        pos = torch.zeros(b, 1, dtype=torch.long)  # [B, 1]
        for r in active:
            tokens[r.index], pos[r.index, 0] = r.last, r.pos + 1
        logits = self._decode_step()(tokens.to(device), pos.to(device))  # [B, V]
        if self.drafter is not None:  # the draft has not seen the tokens fed here
            for r in active:
                self.drafter.skip(r.index, r.last)
        for r, tok in zip(active, self._sample(logits, active)):
            r.pos += 1
            if tok is None:  # its sampling failed
                self.rows[r.index] = None
                continue
            self._push(r, tok)

    def _speculative_step(self, active: list[_Row]) -> bool:
        """One speculative round for all rows (free rows verify their dummy token alone); False
        when no row has a draft (then a plain step runs instead)."""
        device, b = self.model.device, len(self.rows)
        cur = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        pos = torch.zeros(b, dtype=torch.long, device=device)  # [B]
        history: list[list[int]] = [[] for _ in range(b)]  # what ngram looks up (a draft model keeps its own)
        for r in active:
            cur[r.index], pos[r.index] = r.last, r.pos + 1
            if self.drafter is None:
                history[r.index] = r.job.ids + r.text.ids
        self.cache.defer = True  # a quantized cache holds the round's tokens unquantized until settle()
        free = torch.ones(b, dtype=torch.bool, device=device)
        free[[r.index for r in active]] = False
        if self.drafter is not None:
            drafts, lengths = self.drafter.draft(cur, pos, self.spec_k, ~free)
        else:
            drafts, lengths = draft_tokens(self.runner, self.spec, self.cache, cur, pos, history, self.spec_k)
        lengths = lengths.masked_fill(free, 0)
        if drafts.shape[1] == 0 or not bool(lengths.any()):
            self.cache.settle()
            return False
        tokens = torch.cat([cur[:, None], drafts], 1)  # [B, 1 + K]
        starts = [self.cache.lengths[f] for f in self.cache.stages]
        logits = self.runner.multi_step(self.cache, tokens, pos[:, None] + torch.arange(tokens.shape[1], device=device))
        kept = torch.zeros(b, dtype=torch.long, device=device)
        nxt = {}
        for r in active:  # each row with its own sampling parameters and generator
            i = r.index
            try:
                n, t = accept(logits[i:i + 1], drafts[i:i + 1], lengths[i:i + 1], r.job.params, r.generator)
                kept[i], nxt[i] = n[0], int(t[0])
            except Exception as e:  # noqa: BLE001 - this row alone fails
                self._fail(r.job, e)
        keep_accepted(self.cache, starts, kept, tokens.shape[1])
        if self.drafter is not None:
            self.drafter.commit(drafts, kept)
        self.cache.settle()
        for r in active:
            if r.index not in nxt:
                self.rows[r.index] = None
                continue
            new = drafts[r.index, :int(kept[r.index])].tolist() + [nxt[r.index]]
            r.pos += len(new)
            for t in new:
                if self.rows[r.index] is None:  # finished (or failed) within this round
                    break
                self._push(r, t)
        live = lengths > 0
        self.rounds += 1
        self.drafted += int(lengths[live].sum())
        self.accepted += int(kept[live].sum())
        self.spec_k = adapt_k(self.spec, self.spec_k, kept[live], lengths[live])
        return True

    def _decode_step(self) -> Step:
        """The runner's decode step (eager, or fixed-shape in the static and compiled modes) for
        the cache's current stage layout, attending to the first slots that may hold keys (a
        power-of-two bucket, so that a compiled step has a few shapes); made anew when these change."""
        span = step_span(self.cache.length + 1, self.cache.max_len)
        key = (tuple(self.cache.stages), span)
        if key != self._decoder_key:
            self._decoder, self._decoder_key = self.runner.step(self.cache, span), key
        return self._decoder

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """Each row's next token from its own logits row [1, V]: greedy rows in one argmax,
        sampled rows with their own seeded generator (as a batch-1 generate would). A row whose
        sampling fails is answered with the error and gets None."""
        greedy = [r.index for r in rows if r.job.params.greedy]
        picked = {}
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            picked = dict(zip(greedy, logits.index_select(0, idx).argmax(-1).tolist()))
        for r in rows:
            if r.index not in picked:
                try:
                    picked[r.index] = int(sample(logits[r.index:r.index + 1], r.job.params, r.generator)[0])
                except Exception as e:  # noqa: BLE001 - this row alone fails
                    self._fail(r.job, e)
                    picked[r.index] = None
        return [picked[r.index] for r in rows]

    def _finish(self, row: _Row) -> None:
        if self._shared(row.job):
            self._store_answered(row)
        self.rows[row.index] = None
        self.finished += 1
        count = row.text.count
        self.metrics.completion_tokens += count
        if count > 1:
            self.metrics.tpot.observe((time.perf_counter() - row.first_at) / (count - 1))
        if not row.job.cancelled:
            row.job.emit(("done", row.finish()))

    def _store_answered(self, row: _Row) -> None:
        """Keep a finished row's prompt and answer in the prefix cache (a chat's next turn resends
        both): its valid slots hold the prompt and every sampled token but the last (never fed)."""
        fed = row.job.keys + row.text.ids[:row.text.count - 1]
        slots = self.cache.valid[0, row.index, :self.cache.length].nonzero()[:, 0]
        if len(slots) == len(fed):  # else (a layout this does not know) nothing is stored
            self.prefix.store(fed, *row_kv(self.cache, row.index, slots))

    def _guarded(self, fn, *args) -> None:
        """Run a model step; on an unexpected failure, fail the jobs involved, keep serving."""
        try:
            fn(*args)
        except Exception:  # a bug or an out-of-memory: report it to the clients, keep the loop alive
            traceback.print_exc(file=sys.stderr)
            jobs = [r.job for r in self._active()] + [j for a in args for j in a]  # args: the jobs being started
            self.rows = [None] * len(self.rows)
            for job in jobs:
                job.emit(("error", APIError(500, "internal error while generating", None, "internal_error")))


def _videos(videos: list[torch.Tensor]):
    """The group's videos (each [T_i, 3, H, W], job by job) as prefill takes them: [V, T, 3, H, W]
    when their frame counts agree, else the list (as Llava.inputs gives them); None without any."""
    if not videos:
        return None
    return torch.stack(videos) if len({v.shape for v in videos}) == 1 else videos


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The jobs' tensors joined along dim 0 (those without images give None), or None when none has one."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None
