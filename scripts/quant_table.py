"""The quantization table of docs/quantization.md: accuracy on a question set and memory, for full precision,
KIVI 4/2-bit, VidKV, int8 and int4 weights, and one combination with token reduction.

    python scripts/quant_table.py --data heldout [--model DIR] [--batch-size 32] [--limit N]
        [--device D] [--out runs/quant]

Each configuration's results.json/samples.jsonl go to OUT/<name>/; the table (markdown) is
printed and written to OUT/quant.md with OUT/quant.json. KV bytes are those the cache allocates
for one sequence of the set's first question (its prompt + --max-new-tokens slots).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import fastllava
from fastllava.evaluation.dataset import load_dataset
from fastllava.evaluation.runner import evaluate
from fastllava.quant.weights import parameter_bytes

CONFIGS = [  # name, weights, kv_cache, reduce
    ("fp", None, None, None),
    ("kivi-4", None, "kivi:bits=4", None),
    ("kivi-2", None, "kivi:bits=2", None),
    ("vidkv", None, "vidkv", None),
    ("int8", "int8", None, None),
    ("int4", "int4", None, None),
    ("visionzip64+kivi-4+int8", "int8", "kivi:bits=4", "visionzip:keep=64"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model")
    p.add_argument("--device")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, help="as eval's (default: 8, or 96 with describe questions)")
    p.add_argument("--out", default="runs/quant")
    args = p.parse_args()
    data, out = load_dataset(args.data), Path(args.out)
    rows, reference = [], None  # reference: fp's predictions
    for name, weights, kv_cache, reduce in CONFIGS:
        model = fastllava.load(args.model, device=args.device, weights=weights, kv_cache=kv_cache)
        kwargs = {"max_new_tokens": args.max_new_tokens, "reduce": reduce}
        res = evaluate(model, data, args.batch_size, args.limit, out / name, progress=False, generate_kwargs=kwargs)
        first = data.samples[0]
        stats = model.generate(images=[first.image], prompts=[first.asked], **kwargs)[0].stats
        predictions = [json.loads(line)["prediction"] for line in (out / name / "samples.jsonl").read_text().splitlines()]
        f1 = [r["object_f1"] for r in res["families"].values() if "object_f1" in r]
        rows.append({"config": name, "weights": weights or "fp", "kv_cache": kv_cache or "fp", "reduce": reduce,
                     "accuracy": res["overall"]["accuracy"], "n": res["overall"]["n"],
                     "object_f1": f1[0] if f1 else None,
                     "changed": sum(a != b for a, b in zip(predictions, reference or predictions)),
                     "families": {f: r["accuracy"] for f, r in res["families"].items()},
                     "kv_cache_bytes": stats["kv_cache_bytes"], "parameter_bytes": parameter_bytes(model.model)})
        reference = reference or predictions
        print(f"{name}: {rows[-1]['accuracy']:.4f}", flush=True)
    base = rows[0]["accuracy"]
    f1 = rows[0]["object_f1"] is not None  # a describe set: object F1 too
    lines = ["| config | accuracy | vs fp (points) |" + (" object F1 |" if f1 else "")
             + " answers unlike fp's | KV cache per sequence | parameters |",
             "|---|---|---|" + ("---|" if f1 else "") + "---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['accuracy']:.4f} (n={r['n']}) | {100 * (r['accuracy'] - base):+.1f} |"
                     + (f" {r['object_f1']:.4f} |" if f1 else "")
                     + f" {r['changed']} | {r['kv_cache_bytes'] / 2**10:.1f} KiB | {r['parameter_bytes'] / 2**20:.2f} MiB |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
