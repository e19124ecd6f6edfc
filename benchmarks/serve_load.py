"""Load test for `fastllava serve`: N concurrent clients send a fixed number of streaming chat
requests and we report throughput, latency and time to first token (p50/p99), prompt tokens
served from the prefix cache, and errors by status.

Workloads (--workload):
  single  one image and one question per request (images and questions cycle)
  chat    each client holds conversations of --turns turns about one image: every turn resends
          the history (the earlier questions, the answers received, the image) and asks the next
  shared  every request carries the same long system prompt and one of a few images, then its
          own question (an evaluation harness or an agent asking many things about the same inputs)

    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 64            # starts a server
    .venv/bin/python benchmarks/serve_load.py --workload chat --prefix-cache-mb 0  # the same, caches off
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY ...

Without --url, `fastllava serve` is started as a subprocess on a free loopback port (with
--model, --max-batch-size, --device) and stopped at the end. Clients use the standard library
only (http.client, one thread each).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What color is the circle nearest to the blue square? Answer with one word.",
           "How many shapes are there? Answer with a number.", "Is there a red triangle? Answer yes or no.",
           "Describe the image."]
SYSTEM = ("You are a careful visual assistant. Look at every object in the image before answering: its shape, "
          "its color, its size and where it stands relative to the others. Answer the question that follows in "
          "as few words as it needs, with no explanation, and say so when the image does not show what is asked. "
          "Colors are named as red, green, blue, yellow, purple or orange; shapes as circle, square, triangle or "
          "star; counts as numbers.")
WORKLOADS = ("single", "chat", "shared")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key")
    p.add_argument("--model", help="for the started server (default: the embedded model)")
    p.add_argument("--device", help="for the started server")
    p.add_argument("--max-batch-size", type=int, default=8, help="for the started server")
    p.add_argument("--decode", help="for the started server: eager (default), static or compiled")
    p.add_argument("--prefix-cache-mb", type=int, help="for the started server (0: no prefix cache)")
    p.add_argument("--encoder-cache-mb", type=int, help="for the started server (0: no encoder cache)")
    p.add_argument("--workload", choices=WORKLOADS, default="single", help="see above (default single)")
    p.add_argument("--turns", type=int, default=3, help="turns per conversation (--workload chat)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens (decode-heavy load)")
    p.add_argument("--images", default=str(ROOT / "examples"), help="folder of .png/.jpg images to cycle through")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests sent the same way first (compiled "
                   "decoding compiles a step per batch layout and span on first use)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    images = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        p.error(f"no images in {args.images}")
    urls = [f"data:image/{f.suffix[1:].lower()};base64," + base64.b64encode(f.read_bytes()).decode() for f in images]
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args)
    try:
        if args.warmup:
            run_load(url, args, urls, args.warmup)
        report = run_load(url, args, urls, args.requests)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    report.update(workload=args.workload, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                  max_batch_size=None if args.url else args.max_batch_size,
                  decode=None if args.url else args.decode or "eager", warmup=args.warmup,
                  prefix_cache_mb=None if args.url else args.prefix_cache_mb,
                  encoder_cache_mb=None if args.url else args.encoder_cache_mb)
    print(json.dumps(report) if args.json else "\n".join(f"{k:>22}: {v}" for k, v in report.items()))
    return 0 if report["errors"] == {} else 1


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fastllava.cli", "serve", "--port", str(port), "--max-batch-size",
           str(args.max_batch_size), "--max-queue", str(max(args.clients, 1))]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--decode", args.decode] if args.decode else []
    cmd += ["--api-key", args.api_key] if args.api_key else []
    cmd += ["--prefix-cache-mb", str(args.prefix_cache_mb)] if args.prefix_cache_mb is not None else []
    cmd += ["--encoder-cache-mb", str(args.encoder_cache_mb)] if args.encoder_cache_mb is not None else []
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_load: the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if request(url, "GET", "/health", None, None)[0] == 200:
                return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit("serve_load: the server did not start within 300 s")


def request(url: str, method: str, path: str, body: dict | None, key: str | None, on_line=None):
    """(status, response text); on_line(line) is called for each line as it arrives."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        lines = []
        while line := r.readline():
            lines.append(line)
            if on_line is not None and r.status == 200:
                on_line(line)
        return r.status, b"".join(lines).decode()
    finally:
        conn.close()


def messages(workload: str, i: int, image_urls: list[str], history: list[dict]) -> list[dict]:
    """The messages of request i: `history` holds the conversation so far (--workload chat)."""
    if workload == "chat" and history:
        return history + [{"role": "user", "content": PROMPTS[len(history) // 2 % len(PROMPTS)]}]
    image = {"type": "image_url", "image_url": {"url": image_urls[i % len(image_urls)]}}
    question = PROMPTS[(i // len(image_urls)) % len(PROMPTS)] if workload != "chat" else PROMPTS[0]
    system = [{"role": "system", "content": SYSTEM}] if workload == "shared" else []
    return system + [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def run_load(url: str, args, image_urls: list[str], requests: int) -> dict:
    lock = threading.Lock()
    next_index = [0]
    latencies, ttfts, tokens, errors, cached, prompt = [], [], [], {}, [0], [0]
    histories: dict[int, list[dict]] = {}  # client -> its conversation so far (--workload chat)

    def one(i: int, client_id: int) -> None:
        history = histories.get(client_id, [])
        msgs = messages(args.workload, i, image_urls, history)
        body = {"model": model_id, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": args.ignore_eos,
                "messages": msgs}
        start, first, usage, answer = time.perf_counter(), [None], [0], []

        def on_line(line: bytes) -> None:
            if not line.startswith(b"data: {"):
                return
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                answer.append(chunk["choices"][0]["delta"]["content"])
                if first[0] is None:
                    first[0] = time.perf_counter() - start
            if chunk.get("usage"):
                usage[0] = chunk["usage"]["completion_tokens"]
                with lock:
                    cached[0] += chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                    prompt[0] += chunk["usage"]["prompt_tokens"]

        try:
            status, text = request(url, "POST", "/v1/chat/completions", body, args.api_key, on_line)
        except OSError as e:
            status, text = type(e).__name__, ""
        elapsed = time.perf_counter() - start
        with lock:
            if status == 200 and "[DONE]" in text:
                latencies.append(elapsed)
                ttfts.append(first[0] if first[0] is not None else elapsed)
                tokens.append(usage[0])
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
        done = len(msgs) + 1 >= 2 * args.turns or status != 200
        histories[client_id] = [] if done else msgs + [{"role": "assistant", "content": "".join(answer)}]

    def client(client_id: int) -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                return
            one(i, client_id)

    status, text = request(url, "GET", "/v1/models", None, args.api_key)
    if status != 200:
        sys.exit(f"serve_load: GET /v1/models answered {status}: {text[:300]}")
    model_id = json.loads(text)["data"][0]["id"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {"ok": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "output_tok_per_s": round(sum(tokens) / wall, 1),
            "mean_output_tokens": round(float(np.mean(tokens)), 1) if tokens else None,
            "latency_p50_ms": pct(latencies, 50), "latency_p99_ms": pct(latencies, 99),
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "prompt_tokens": prompt[0], "cached_prompt_tokens": cached[0]}


if __name__ == "__main__":
    sys.exit(main())
