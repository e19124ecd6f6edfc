#!/usr/bin/env python
"""Speculative decoding on real answers: acceptance and decode speed of each spec against plain
greedy decoding, side by side in one run, on a question set's long answers.

    fastllava data shapes --families describe --n 60 --seed S --out describe
    python benchmarks/speculate_answers.py --data describe --out runs/speculate-answers [--draft-layers 2]

For every batch of questions, plain decoding and then each spec run in turn (the order rotating
from batch to batch, so that a slow spell of a shared machine is spread over all of them); each
run's decode time is its total time less its time to the first token. The report gives, per
decode: decode tok/s over all questions, the speed-up over plain, drafted and kept tokens,
tokens per verify step, whether every answer equals plain greedy's token for token, and the
exact-match accuracy. Writes OUT/speculate.json and OUT/speculate.md.

`--draft-layers N` also measures a draft model (`draft:model=DIR`) made of the target's first N
decoder layers, its final norm and head (written to OUT/draft-N): a stand-in for a smaller
checkpoint of the same family, where none is at hand. It sees the image as the target does.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from fastllava import load
from fastllava.errors import UserError
from fastllava.evaluation import load_dataset
from fastllava.evaluation.progress import Progress
from fastllava.evaluation.scoring import is_correct

DEFAULT_SPECS = ("ngram", "ngram:k=8", "layerskip")


def measure(model, samples, specs: list[str], batch_size: int, max_new_tokens: int) -> dict:
    """{decode name: totals} over `samples` (see the module's docstring)."""
    from PIL import Image

    names = ["plain", *specs]
    totals = {n: {"decode_s": 0.0, "tokens": 0, "draft": 0, "kept": 0, "steps": 0, "same": True, "correct": 0}
              for n in names}
    bar = Progress("speculate", len(samples))
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        images = [Image.open(s.image).convert("RGB") for s in batch]
        prompts = [s.asked for s in batch]
        turn = (start // batch_size) % len(names)
        answers = {}  # name -> this batch's token ids
        for name in names[turn:] + names[:turn]:
            results = model.generate(images=images, prompts=prompts, max_new_tokens=max_new_tokens,
                                     speculate=None if name == "plain" else name)
            t = totals[name]
            for s, r in zip(batch, results):
                t["decode_s"] += r.stats["total_s"] - r.stats["ttft_s"]
                t["tokens"] += max(r.stats["generated_tokens"] - 1, 0)
                t["correct"] += is_correct(r.text, s.answer)
                spec = r.stats.get("speculate")
                if spec:
                    t["draft"] += spec["draft_tokens"]
                    t["kept"] += spec["accepted_tokens"]
                    t["steps"] += spec["verify_steps"]
            answers[name] = [list(r.token_ids) for r in results]
        for name in specs:  # every spec's answers against plain greedy's of the same batch
            totals[name]["same"] &= answers[name] == answers["plain"]
        bar.update(len(batch))
    bar.close()
    base = totals["plain"]["tokens"] / max(totals["plain"]["decode_s"], 1e-9)
    for name, t in totals.items():
        t["tok_s"] = t["tokens"] / max(t["decode_s"], 1e-9)
        t["speedup"] = t["tok_s"] / base
        t["accuracy"] = t["correct"] / len(samples)
    return totals


def first_layers(model_dir: Path, n: int, out: Path) -> Path:
    """A copy of the checkpoint in model_dir with only its first n decoder layers -> its folder."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    depth = config["text_config"]["num_hidden_layers"]
    if not 1 <= n < depth:
        raise UserError(f"--draft-layers must be in 1..{depth - 1} for this {depth}-layer model, got {n}")
    state = load_file(str(model_dir / "model.safetensors"))
    layer = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")
    kept = {k: v for k, v in state.items() if not ((m := layer.search(k)) and int(m.group(1)) >= n)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["text_config"]["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def table(totals: dict) -> str:
    lines = ["| decode | decode tok/s | speed-up | drafts kept | tokens per verify step | same tokens as plain | exact match |",
             "|---|---|---|---|---|---|---|"]
    for name, t in totals.items():
        kept = f"{t['kept']}/{t['draft']} ({t['kept'] / t['draft']:.0%})" if t["draft"] else "-"
        per_step = f"{(t['tokens']) / t['steps']:.2f}" if t["steps"] else "1"
        same = "-" if name == "plain" else ("yes" if t["same"] else "NO")
        lines.append(f"| {'plain' if name == 'plain' else f'`{name}`'} | {t['tok_s']:.0f} | {t['speedup']:.2f}x | "
                     f"{kept} | {per_step} | {same} | {t['accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a question set (fastllava data shapes --families describe ...)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--speculate", action="append", help=f"a spec to measure (repeatable; default {', '.join(DEFAULT_SPECS)})")
    p.add_argument("--limit", type=int, default=60, help="questions to use (default 60)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--draft-layers", type=int, metavar="N",
                   help="also measure a draft model made of the target's first N decoder layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/speculate-answers")
    args = p.parse_args()
    try:
        if args.limit < 1 or args.batch_size < 1:
            raise UserError("--limit and --batch-size must be >= 1")
        data = load_dataset(args.data)
        samples = data.samples[:args.limit]
        if not samples:
            raise UserError(f"{args.data} holds no questions")
        model = load(args.model, device=args.device)
        specs = args.speculate or list(DEFAULT_SPECS)
        if args.draft_layers is not None:
            draft = first_layers(Path(model.path), args.draft_layers, Path(args.out) / f"draft-{args.draft_layers}")
            specs.append(f"draft:model={draft}")
        began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        totals = measure(model, samples, specs, args.batch_size, args.max_new_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(args.data), "model": args.model or "default", "questions": len(samples),
                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "device": args.device,
                "date": began, "command": " ".join(sys.argv)}
    (out / "speculate.json").write_text(json.dumps({"settings": settings, "decodes": totals}, indent=1))
    md = table(totals)
    (out / "speculate.md").write_text(f"{md}\n\n{json.dumps(settings)}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
