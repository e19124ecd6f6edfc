"""The text of one generated sequence: token ids, stop strings, streamed deltas (never a broken
UTF-8 character), finish reason and the token count that usage reports."""

from __future__ import annotations

from typing import Callable


def visible_text(decode: Callable[[list[int]], str], ids: list[int], stops: list[str]) -> tuple[str, bool]:
    """The decoded ids cut before the first stop string, and whether one was found."""
    text = decode(ids)
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


class TextState:
    """One sequence being generated. `push` each sampled token: it returns the text delta to
    stream ("" when nothing new, or when not streaming) and whether the sequence is finished (EOS,
    a stop string, max_new_tokens); `finish` returns the final text and what streaming held back."""

    def __init__(self, decode: Callable[[list[int]], str], eos: set[int] | list[int], stop: list[str],
                 max_new_tokens: int, stream: bool = False):
        self.decode, self.eos, self.stop, self.max_new_tokens = decode, set(eos), list(stop), max_new_tokens
        self.watch = stream or bool(self.stop)  # decode as it goes; otherwise only at the end
        self.stream = stream
        self.ids: list[int] = []  # generated ids, EOS excluded
        self.count = 0  # generated tokens, EOS included (as usage counts them)
        self.reason = "length"  # "stop" (EOS or a stop string) or "length"
        self.done = False
        self.streamed = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Take a sampled token -> (text delta, finished)."""
        if self.done:
            return "", True
        self.count += 1
        if token in self.eos:
            self.reason, self.done = "stop", True
            return "", True
        self.ids.append(token)
        delta = ""
        if self.watch:
            text, stopped = visible_text(self.decode, self.ids, self.stop)
            if self.stream and not text.endswith("\ufffd") and text.startswith(self.streamed):
                delta, self.streamed = text[len(self.streamed):], text
            if stopped:
                self.reason, self.done = "stop", True
        if self.count >= self.max_new_tokens:
            self.done = True
        return delta, self.done

    def finish(self) -> tuple[str, str]:
        """-> (the final text, the delta streaming held back: an incomplete character at the end)."""
        text = visible_text(self.decode, self.ids, self.stop)[0]
        held = ""
        if self.stream and text.startswith(self.streamed):
            held, self.streamed = text[len(self.streamed):], text
        return text, held
