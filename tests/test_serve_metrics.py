"""GET /metrics: Prometheus text with answers by route and status, tokens in and out, queue,
running rows, KV-cache slots, and time-to-first-token / per-token histograms that move with load."""

from __future__ import annotations

import re

import fastllava
from fastllava.serve.settings import Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint, user_message


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_metrics_count_requests_tokens_and_latencies(tmp_path):
    llava = fastllava.load(tiny_checkpoint(tmp_path / "m"), device="cpu")
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0,
            "messages": user_message("describe it .", data_url(png_bytes(random_image(1))))}
    with running_server(llava, Settings(model_id="tiny")) as base:
        status, before = raw_request(base, "GET", "/metrics")
        assert status == 200 and _value(before, "fastllava_completion_tokens_total") == 0
        answers = [raw_request(base, "POST", "/v1/chat/completions", body)[1] for _ in range(3)]
        assert raw_request(base, "POST", "/v1/chat/completions", {"model": "tiny"})[0] == 400
        status, text = raw_request(base, "GET", "/metrics")
    assert status == 200
    assert _value(text, 'fastllava_requests_total{route="/v1/chat/completions",status="200"}') == 3
    assert _value(text, 'fastllava_requests_total{route="/v1/chat/completions",status="400"}') == 1
    assert _value(text, "fastllava_completion_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers)
    assert _value(text, "fastllava_prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert _value(text, "fastllava_time_to_first_token_seconds_count") == 3
    assert _value(text, 'fastllava_time_to_first_token_seconds_bucket{le="+Inf"}') == 3
    assert _value(text, "fastllava_time_to_first_token_seconds_sum") > 0
    assert _value(text, "fastllava_time_per_output_token_seconds_count") == sum(
        a["usage"]["completion_tokens"] > 1 for a in answers)
    assert _value(text, "fastllava_queue_length") == 0 and _value(text, "fastllava_running_rows") == 0
    assert _value(text, "fastllava_kv_cache_slots") > 0
