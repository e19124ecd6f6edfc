"""End-to-end time of one greedy generation, fastllava against transformers on the same weights,
timed in pairs (ours, theirs, ours, theirs, ...) so that a slower or faster spell of a shared
machine touches both: prints the medians and the median of the per-pair ratios.

    python benchmarks/paired_e2e.py [--decode eager] [--pairs 30] [--new-tokens 32] [--device cpu]

Uses only the public API (fastllava.load, Llava.generate_ids) and bench's input and transformers
twin helpers, on the embedded model at batch 1 (40 text tokens around one image)."""

import argparse
import statistics
import time

import torch

import fastllava
from fastllava.bench.measure import Case, bench_inputs, hf_twin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", default="eager")
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    llava = fastllava.load(device=args.device, decode=args.decode)
    hf = hf_twin(llava.model)
    ids, mask, pixels, _ = bench_inputs(llava.model, Case(1, None, 40, args.new_tokens))
    n = args.new_tokens

    def ours() -> torch.Tensor:
        return llava.generate_ids(ids, pixels, mask, max_new_tokens=n, eos_token_id=None)

    def theirs() -> torch.Tensor:
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, max_new_tokens=n)
        return out[:, ids.shape[1]:]

    times = {"ours": [], "theirs": []}
    with torch.inference_mode():
        for i in range(args.warmup + args.pairs):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                tokens = fn()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                if name == "ours":
                    mine = tokens
            same = torch.equal(mine, tokens)
    ratios = [t / o for o, t in zip(times["ours"], times["theirs"])]
    print(f"decode={args.decode} pairs={args.pairs} new_tokens={n}: ours {statistics.median(times['ours']) * 1e3:.1f} ms, "
          f"transformers {statistics.median(times['theirs']) * 1e3:.1f} ms (medians), "
          f"speed-up x{statistics.median(ratios):.2f} (median of pair ratios), same tokens: {same}")


if __name__ == "__main__":
    main()
