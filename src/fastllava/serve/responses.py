"""OpenAI response objects: chat.completion, chat.completion.chunk (SSE), usage, models."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from .scheduler import Finish


@dataclass
class Completion:
    """What every response object of one request shares."""

    model: str
    prompt_tokens: int  # text + image + video tokens fed to the language model
    image_tokens: int
    video_tokens: int = 0
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or f"chatcmpl-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def usage(self, fin: Finish) -> dict:
        """Token counts; `cached_tokens`: prompt tokens taken from the prefix cache; with a
        reduction, `visual_tokens` lists the visual tokens entering the language model, then left
        after each cut inside it; `video_tokens` only when the prompt holds a video."""
        details = {"cached_tokens": fin.cached_tokens, "image_tokens": self.image_tokens,
                   "text_tokens": self.prompt_tokens - self.image_tokens - self.video_tokens}
        if self.video_tokens:
            details["video_tokens"] = self.video_tokens
        if fin.visual_tokens is not None:
            details["visual_tokens"] = fin.visual_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": fin.completion_tokens,
                "total_tokens": self.prompt_tokens + fin.completion_tokens, "prompt_tokens_details": details}

    def message(self, fin: Finish) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text, "refusal": None},
                             "logprobs": None, "finish_reason": fin.finish_reason}],
                "usage": self.usage(fin)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def usage_chunk(self, fin: Finish) -> str:
        return sse({**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(fin)})

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": "fastllava"}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "fastllava"}


def model_list(names, created: int) -> dict:
    """GET /v1/models: one card per served name (the model's id, then its aliases)."""
    names = (names,) if isinstance(names, str) else names
    return {"object": "list", "data": [model_card(n, created) for n in names]}
