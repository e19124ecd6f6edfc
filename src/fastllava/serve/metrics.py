"""The server's metrics in Prometheus' text format (`GET /metrics`): requests by route and status,
queue length, running rows, KV-cache slots in use, tokens in and out, encoder and prefix cache
hits, time to first token and time per output token as histograms. Counters are updated on the scheduler's thread and the event loop;
each update is one Python operation on an int or a list slot."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # seconds per token


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), then +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # (route, status) -> answers
    prompt_tokens: int = 0  # prompts admitted (images included)
    completion_tokens: int = 0  # generated, EOS included
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))  # submit -> first token
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))  # per token after the first

    def render(self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; `gauges` and `counters`: name -> (help, value) read now from the
        scheduler (the caches' counters live with the caches)."""
        lines = ["# HELP fastllava_requests_total HTTP answers by route and status",
                 "# TYPE fastllava_requests_total counter"]
        lines += [f'fastllava_requests_total{{route="{route}",status="{status}"}} {n}'
                  for (route, status), n in sorted(self.requests.items())]
        for name, help_text, value in (("fastllava_prompt_tokens_total", "prompt tokens admitted", self.prompt_tokens),
                                       ("fastllava_completion_tokens_total", "tokens generated",
                                        self.completion_tokens)):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, (help_text, value) in (counters or {}).items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += self.ttft.lines("fastllava_time_to_first_token_seconds", "from submission to the first token")
        lines += self.tpot.lines("fastllava_time_per_output_token_seconds", "per generated token after the first")
        return "\n".join(lines) + "\n"
