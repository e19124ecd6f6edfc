"""fastllava as an lmms-eval model: `lmms-eval --model fastllava --model_args pretrained=DIR,...`.

lmms-eval (0.7+, the `lmms` extra: pip install 'fastllava[lmms]') finds it through the entry
point group `lmms_eval.models` (pyproject.toml), whose payload `manifest()` names the chat model
class `FastLlava` (`is_simple = False`: requests carry `doc_to_messages`). The model's logic lives
in `FastLlavaLMM`, which does not import lmms-eval; `FastLlava` is it on lmms-eval's `lmms` base
class, made when first asked for (so importing this module never needs lmms-eval).

Requests (lmms-eval's `Instance.args`):
  generate_until              (context, doc_to_messages, gen_kwargs, doc_id, task, split); the
                              simple shape (context, gen_kwargs, doc_to_visual, doc_id, task, split)
                              is taken too
  generate_until_multi_round  as generate_until; round r > 0 asks doc_to_messages(doc, round_idx=r,
                              previous_output=[...], previous_round_info=...) for (messages,
                              terminal, previous_output, previous_round_info)
  loglikelihood               (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
                              split) -> (sum of the continuation's log-probabilities, whether it
                              is the greedy continuation)
Messages are rendered as `fastllava serve` renders a chat request (prompts.PromptEncoder.chat_ids):
system text first in the first user turn, images before their turn's text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import torch

from ..errors import UserError
from ..prompts import Conversation, Turn

ENTRY_POINT = "fastllava"  # the --model name
DEFAULT_MAX_NEW_TOKENS = 1024  # as lmms-eval's chat models when a task does not say


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for `--model fastllava`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=ENTRY_POINT, chat_class_path=f"{__name__}.FastLlava")


def __getattr__(name: str):
    if name == "FastLlava":  # lmms-eval's registry imports this module and asks for the class
        cls = _lmms_class()
        globals()["FastLlava"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lmms_class():
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        raise UserError("the lmms-eval model needs lmms-eval, from the lmms extra: pip install 'fastllava[lmms]'") from None

    class FastLlava(FastLlavaLMM, lmms):
        """fastllava on lmms-eval's model interface (see the module's docstring)."""

        is_simple = False

    FastLlava.__module__, FastLlava.__qualname__ = __name__, "FastLlava"
    return FastLlava


class FastLlavaLMM:
    """The lmms-eval model interface over a fastllava.Llava, without lmms-eval itself.

    Model args: pretrained (a checkpoint folder; default: the embedded model), reduce (a token
    reduction spec for every request), kv_cache, weights, decode (as `fastllava.load`), device,
    dtype, batch_size (requests generated together)."""

    is_simple = False

    def __init__(self, pretrained: str | None = None, reduce: str | None = None, kv_cache: str | None = None,
                 weights: str | None = None, decode: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, model=None, **ignored):
        super().__init__()
        import fastllava

        for attr, value in (("_rank", 0), ("_world_size", 1), ("task_dict", {})):
            if not hasattr(self, attr):  # set by lmms' __init__ when there is one
                setattr(self, attr, value)
        unknown = sorted(k for k, v in ignored.items() if v is not None)
        if unknown:
            print(f"fastllava: warning: lmms-eval model args ignored: {', '.join(unknown)}", file=sys.stderr)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.reduce = _none(reduce)
        self.model = model if model is not None else fastllava.load(
            _none(pretrained), device=_none(device), dtype=_none(dtype), weights=_none(weights),
            kv_cache=_none(kv_cache), decode=_none(decode))
        if self.model.prompts is None:
            raise UserError("this checkpoint has no tokenizer.json, so it cannot answer text prompts")
        if self.reduce is not None:
            from ..reduction.runtime import make_reduction

            make_reduction(self.reduce, self.model.config)  # a bad spec fails before any request

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ---- generation ----

    def generate_until(self, requests) -> list[str]:
        asks = [self._ask(r.args) for r in requests]
        return self._answer(asks)

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        return [self._rounds(r.args) for r in requests]

    def _rounds(self, args) -> list[str]:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = args
        if not callable(doc_to_messages):
            return [self._answer([self._ask(args)])[0]]
        doc = self.task_dict[task][split][doc_id]
        history, outputs, info = [], [], None
        while True:
            if not outputs:
                messages = doc_to_messages(doc)
            else:
                payload = doc_to_messages(doc, round_idx=len(outputs), previous_output=list(outputs),
                                          previous_round_info=info)
                if not (isinstance(payload, tuple) and len(payload) == 4):
                    break
                messages, terminal, _, info = payload
                if terminal or messages is None:
                    break
            messages = _plain(messages)
            if any(m["role"] == "assistant" for m in messages):
                history = messages  # the task carries the conversation itself
            else:
                history = history + ([{"role": "assistant", "content": outputs[-1]}] if outputs else []) + messages
            turns, images = to_turns(history)
            outputs.append(self._answer([(turns, images, dict(gen_kwargs or {}))])[0])
        return outputs

    def _ask(self, args) -> tuple[list[Turn], list, dict]:
        """(turns, images, gen_kwargs) of one generate_until request, either shape."""
        context, second, third, doc_id, task, split = args[:6]
        if isinstance(second, dict) or second is None:  # simple: (context, gen_kwargs, doc_to_visual, ...)
            visuals = _visuals(third, self._doc(task, split, doc_id)) if third is not None else []
            return [Turn("user", context, len(visuals))], visuals, dict(second or {})
        messages = second(self._doc(task, split, doc_id)) if callable(second) else second
        turns, images = to_turns(_plain(messages))
        return turns, images, dict(third or {})

    def _doc(self, task, split, doc_id):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"no document {doc_id!r} of task {task!r} split {split!r} in task_dict") from None

    def _answer(self, asks: list[tuple[list[Turn], list, dict]]) -> list[str]:
        """Answers in order: requests with at most one image and the same generation settings go
        through model.generate in batches of batch_size; others one by one (generate_ids)."""
        out: list[str | None] = [None] * len(asks)
        groups: dict[str, list[int]] = {}
        for i, (turns, images, kw) in enumerate(asks):
            if len(images) > 1:
                out[i] = self._one(turns, images, kw)
            else:
                groups.setdefault(json.dumps(_sampling(kw), sort_keys=True, default=str), []).append(i)
        for key, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                kw = _sampling(asks[batch[0]][2])
                convs = [Conversation(asks[i][0]) for i in batch]
                images = [asks[i][1][0] if asks[i][1] else None for i in batch]
                kw["max_new_tokens"] = self._room(kw["max_new_tokens"], convs, images)
                results = self.model.generate(images=images, prompts=convs, reduce=self.reduce, **kw)
                for i, conv, r in zip(batch, convs, results):
                    out[i] = r.text
                    self._cache("generate_until", (str(conv), asks[i][2]), r.text)
        return out

    def _room(self, wanted: int, convs: list[Conversation], images: list) -> int:
        """max_new_tokens cut to what the longest prompt leaves in the context (at least 1)."""
        m = self.model
        longest = 0
        for conv, image in zip(convs, images):
            counts = self._counts([image] if image is not None else [])
            longest = max(longest, len(m.prompts.chat_ids(conv.turns, counts)))
        return max(1, min(wanted, m.config.text.max_position_embeddings - longest))

    def _counts(self, images: list) -> list[int]:
        from ..images import load_image

        config = self.model.config
        if not config.is_next:
            return [self.model.prompts.features_per_image] * len(images)
        return [config.image_tokens(im.height, im.width) for im in (load_image(x) for x in images)]

    def _one(self, turns: list[Turn], images: list, kw: dict) -> str:
        """One request with several images: its ids (each image's tokens in order) through generate_ids."""
        m = self.model
        pixel_values, image_sizes, counts = self._pixels(images)
        ids = m.prompts.chat_ids(turns, counts)
        kw = _sampling(kw)
        n = max(1, min(kw.pop("max_new_tokens"), m.config.text.max_position_embeddings - len(ids)))
        stops = kw.pop("stop")
        new = m.generate_ids(torch.tensor([ids]), pixel_values, max_new_tokens=n, reduce=self.reduce,
                             image_sizes=image_sizes, **kw)[0].tolist()
        eos = set(m._eos_ids(-1))
        kept = []
        for t in new:
            if t in eos:
                break
            kept.append(t)
        text, _ = m.visible_text(kept, stops)
        self._cache("generate_until", (m.prompts.format_turns(turns), kw), text)
        return text

    def _pixels(self, images: list):
        """(pixel_values, image_sizes or None, each image's token count) as Llava.inputs makes them."""
        if not images:
            return None, None, []
        m = self.model
        if m.config.is_next:
            pixel_values, image_sizes = m.processor(images)
            return pixel_values, image_sizes, [m.config.image_tokens(h, w) for h, w in image_sizes.tolist()]
        return m.processor(images), None, [m.prompts.features_per_image] * len(images)

    # ---- log-likelihood ----

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._loglikelihood(r.args) for r in requests]

    def _loglikelihood(self, args) -> tuple[float, bool]:
        context, target, doc_to_visual, doc_id, task, split = args[:6]
        doc = None
        if callable(target) or doc_to_visual is not None:
            doc = self._doc(task, split, doc_id)
        continuation = target(doc) if callable(target) else target
        if isinstance(continuation, list):  # doc_to_target may give the answers; the first is scored
            continuation = continuation[0]
        continuation = str(continuation)
        images = _visuals(doc_to_visual, doc) if doc_to_visual is not None else []
        ctx_ids, cont_ids, pixel_values, image_sizes = self.continuation_ids(context, continuation, images)
        if not cont_ids:
            return 0.0, True
        m = self.model
        ids = torch.tensor([ctx_ids + cont_ids])
        logits = m.logits(ids, pixel_values, reduce=self.reduce, image_sizes=image_sizes)[0]
        scored = logits[len(ctx_ids) - 1:-1].log_softmax(-1)  # the distributions predicting each continuation id
        target_ids = torch.tensor(cont_ids, device=scored.device)
        logprob = float(scored.gather(-1, target_ids[:, None]).sum())
        greedy = bool((scored.argmax(-1) == target_ids).all())
        self._cache("loglikelihood", (context, continuation), (logprob, greedy))
        return logprob, greedy

    def continuation_ids(self, context: str, continuation: str, images: list):
        """(prompt ids, continuation ids, pixel_values, image_sizes): the prompt is one user turn
        (the images, then `context`) and the assistant prompt; the continuation is the answer's
        tokens as the tokenizer splits prompt + continuation (else the continuation alone)."""
        m = self.model
        pixel_values, image_sizes, counts = self._pixels(images)
        turns = [Turn("user", context, len(images))]
        ctx_ids = m.prompts.chat_ids(turns, counts)
        whole = m.prompts.encode(m.prompts.format_turns(turns) + continuation, counts)
        if whole[:len(ctx_ids)] == ctx_ids:
            cont_ids = whole[len(ctx_ids):]
        else:  # the tokenizer merged across the boundary
            cont_ids = m.prompts.tokenizer.encode(continuation, add_special_tokens=False).ids
        return ctx_ids, cont_ids, pixel_values, image_sizes

    def _cache(self, kind: str, key, value) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(hook, "add_partial"):
            hook.add_partial(kind, key, value)


# ---- lmms-eval messages -> turns ----

def to_turns(messages: Sequence[dict]) -> tuple[list[Turn], list]:
    """lmms-eval chat messages (dicts or its pydantic ChatMessage; content a string or parts of
    type text / image, the image under "url" or "image") -> (turns, images in order). System text
    goes first in the first user turn; consecutive messages of one role make one turn."""
    system, turns, images = [], [], []
    for i, m in enumerate(messages):
        role = _field(m, "role")
        texts, count = [], 0
        content = _field(m, "content")
        for part in [content] if isinstance(content, str) else content or []:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = _field(part, "type")
            if kind == "text":
                texts.append(_field(part, "text"))
            elif kind == "image":
                images.append(_field(part, "url") if _field(part, "url") is not None else _field(part, "image"))
                count += 1
            else:
                raise UserError(f"message {i}: {kind!r} content is not supported by fastllava (text and images only)")
        text = "\n".join(t for t in texts if t)
        if role == "system":
            system.append(text)
        elif role in ("user", "assistant"):
            if count and role != "user":
                raise UserError(f"message {i}: images are only supported in user messages")
            if turns and turns[-1][0] == role:
                turns[-1][1].append(text)
                turns[-1][2] += count
            else:
                turns.append([role, [text], count])
        else:
            raise UserError(f"message {i}: role {role!r} is not supported (system, user or assistant)")
    if not turns or turns[0][0] != "user":
        turns.insert(0, ["user", [], 0])
    turns[0][1][:0] = system
    return [Turn(r, "\n".join(t for t in texts if t), n) for r, texts, n in turns], images


def _plain(messages) -> list[dict]:
    """Messages as dicts (lmms-eval may hand ChatMessages, a list of ChatMessage, or dicts)."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def _field(obj, key: str):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _visuals(doc_to_visual, doc) -> list:
    visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
    if visuals is None:
        return []
    return [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]


def _sampling(gen_kwargs: dict) -> dict:
    """model.generate's sampling arguments from lmms-eval's gen_kwargs: max_new_tokens, temperature
    (0 or do_sample false: greedy), top_p (None: 1), top_k, seed, `until` as stop strings."""
    kw = gen_kwargs or {}
    until = kw.get("until")
    stops = [until] if isinstance(until, str) else list(until or [])
    temperature = float(kw.get("temperature") or 0.0)
    if kw.get("do_sample") is False:
        temperature = 0.0
    top_p = kw.get("top_p")
    out = {"max_new_tokens": int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), "temperature": temperature,
           "top_p": 1.0 if top_p is None else float(top_p), "stop": [s for s in stops if s]}
    if kw.get("top_k"):
        out["top_k"] = int(kw["top_k"])
    if kw.get("seed") is not None:
        out["seed"] = int(kw["seed"])
    return out


def _none(value):
    """lmms-eval's model args arrive as strings: "" and "none" mean not given."""
    return None if value is None or str(value).lower() in ("", "none") else value


def _positive_int(value, name: str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return 8
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return n
