"""The server's continuous batching answers as `generate` does, on a device and decode mode of your
choice (tests/test_serve.py checks the same on the CPU over HTTP; this runs in-process, for a GPU):
jobs with different prompts, images, lengths and reductions go through one Scheduler together and
each answer is compared with the eager `generate` of that job alone.

    .venv/bin/python benchmarks/serve_check.py --device cuda --decode compiled

Prints one line per mode and exits 1 when an answer differs.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch
from PIL import Image

import fastllava
from fastllava.generation import SamplingParams
from fastllava.serve.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What color is the circle? Answer with one word.", "How many objects are there? Answer with one word.",
           "Is there a red square? Answer with one word.", "Describe the image."]
REDUCE = [None, "dart:keep=64,pivots=-1,merge=prop", "fastv:keep=64", "fastervlm:keep=64,merge=prop"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode", default="compiled", help="the server's decode mode to check (eager, static, compiled)")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=4)
    args = p.parse_args(argv)
    reference = fastllava.load(device=args.device, dtype=args.dtype)  # eager
    served = fastllava.load(device=args.device, dtype=args.dtype, decode=args.decode)
    images = [Image.open(ROOT / f"examples/shapes_{i}.png") for i in (1, 2, 3)]
    jobs = [(images[i % 3], PROMPTS[i % 4], REDUCE[i % len(REDUCE)], 4 + (i * 7) % 40) for i in range(args.jobs)]
    expected = [reference.generate(images=[img], prompts=[prompt], max_new_tokens=n, reduce=spec)[0].text
                for img, prompt, spec, n in jobs]
    scheduler = Scheduler(served, args.max_batch_size, args.jobs, 1024)
    scheduler.start()
    answers, done = [None] * len(jobs), threading.Semaphore(0)
    for i, (img, prompt, spec, n) in enumerate(jobs):
        inputs = served.inputs([img], [prompt])
        ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()

        def emit(event, i=i):
            if event[0] != "delta":
                answers[i] = event[1].text if event[0] == "done" else f"error: {event[1]}"
                done.release()

        params = SamplingParams(max_new_tokens=n).validate()
        scheduler.submit(Job(ids, inputs["pixel_values"], inputs.get("image_sizes"), params, False, emit, spec))
    for _ in jobs:
        done.acquire()
    scheduler.stop()
    same = [a == e for a, e in zip(answers, expected)]
    print(f"serve --decode {args.decode} on {served.model.device}: {sum(same)}/{len(jobs)} answers equal eager "
          f"generate" + ("" if all(same) else f"; first difference: {answers[same.index(False)]!r} "
                                             f"vs {expected[same.index(False)]!r}"))
    return 0 if all(same) else 1


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
