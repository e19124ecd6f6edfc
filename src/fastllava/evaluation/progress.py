"""A tiny progress bar on stderr: `\\r name 123/1000 [4.1s, 30.0/s]` on a terminal, only the
final line otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, name: str, total: int, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = 0.1):
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.done = 0
        self.start = time.perf_counter()
        self._shown = 0.0
        self._closed = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"{self.name} {self.done}/{self.total} [{elapsed:.1f}s, {rate:.1f}/s]"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.live and now - self._shown >= self.interval_s:
            self._shown = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and not self._closed:
            self.stream.write(("\r" if self.live else "") + self.line() + "\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
