"""`fastllava data shapes ...` and `fastllava eval ...`: argparse sub-commands. Each handler takes
the parsed Namespace, returns an exit code, and raises UserError for user mistakes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli_args import add_model_args, add_quant_args, load_options, positive_int
from ..errors import UserError
from .questions import ALL_FAMILIES, FAMILIES


def _families(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in ALL_FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown families {unknown or text!r}; choose from {','.join(ALL_FAMILIES)}")
    return names


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """`data shapes --n N --seed S --out DIR [--variant V] [--image-size PX] [--families a,b] [--overwrite]`."""
    data = subparsers.add_parser("data", help="generate synthetic datasets")
    kinds = data.add_subparsers(dest="dataset", required=True)
    shapes = kinds.add_parser("shapes", help="coloured shapes with one-word questions (color, count, ...)")
    shapes.add_argument("--n", type=positive_int, required=True, help="number of questions")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--variant", default="default", help="default (1-6 objects on one square tile), dense "
                        "(7-12 smaller objects on one tile: a hard set for token reduction) or hires (4-10 small "
                        "objects on canvases of 2-4 tiles, for LLaVA-NeXT)")
    shapes.add_argument("--image-size", type=positive_int, default=336,
                        help="side of a tile in pixels (default 336): the default variant's image side")
    shapes.add_argument("--families", type=_families,
                        help=f"comma-separated subset of {','.join(ALL_FAMILIES)} (default: {','.join(FAMILIES)}; "
                             "describe asks for every object from left to right; eval then answers in up to 96 tokens)")
    shapes.add_argument("--questions-per-image", type=positive_int, default=3)
    shapes.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    shapes.set_defaults(func=cmd_data_shapes)
    return data


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """`eval [--model M] --data DIR [--batch-size B] [--limit N] [--out DIR] [--device D] [--dtype T]`."""
    p = subparsers.add_parser("eval", help="score a model on a question set (exact match)")
    add_model_args(p)
    add_quant_args(p)
    p.add_argument("--data", required=True, help="dataset directory holding questions.jsonl")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--limit", type=positive_int, help="score only the first N questions")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="longest answer in tokens (default: 8, or 96 when the set holds describe questions)")
    p.add_argument("--out", help="results directory (default: runs/eval-<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--reduce", help="visual token reduction spec; several (fastv,visionzip:contextual=8) "
                                    "or --keep run a sweep against the unreduced model")
    p.add_argument("--keep", type=_budgets, help="budgets for a sweep, e.g. 192,128,64,32,16")
    p.add_argument("--speculate", help="speculative decoding spec, e.g. ngram or layerskip:k=4 (same answers "
                                       "when greedy; see docs/speculative.md)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline, one model replica per actor "
                                                      "(a local cluster, or RAY_ADDRESS; needs fastllava[ray])")
    p.add_argument("--replicas", type=positive_int,
                   help="with --ray: model replicas (default: the GPUs on CUDA, else 1)")
    p.set_defaults(func=cmd_eval)
    return p


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """`analyze [--model M] --data DIR [--reduce SPEC] [--limit N] --out DIR`: text dominance (MDI, AEI)."""
    p = subparsers.add_parser("analyze", help="text dominance of the answer's attention: MDI and AEI per layer "
                                              "(see docs/analysis.md)")
    add_model_args(p)
    add_quant_args(p)
    p.add_argument("--data", required=True, help="dataset directory holding questions.jsonl")
    p.add_argument("--reduce", help="a visual token reduction before the LLM, e.g. fastervlm:keep=64")
    p.add_argument("--limit", type=positive_int, help="analyze only the first N questions")
    p.add_argument("--out", required=True, help="output directory (analysis.json, analysis.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)
    return p


def add_lmms_task_parser(subparsers) -> argparse.ArgumentParser:
    """`lmms-task --data DIR --out DIR [--name NAME] [--max-new-tokens N] [--overwrite]`."""
    p = subparsers.add_parser("lmms-task", help="write a question set as a local lmms-eval task "
                                                "(lmms-eval --include_path OUT --tasks NAME; docs/lmms-eval.md)")
    p.add_argument("--data", required=True, help="dataset directory holding questions.jsonl")
    p.add_argument("--out", required=True, help="task folder to write (NAME.yaml, NAME.jsonl, utils.py)")
    p.add_argument("--name", default="shapes", help="the task's name (default: shapes)")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="as eval's (default: 8, or 96 when the set holds describe questions)")
    p.add_argument("--overwrite", action="store_true", help="replace a task of that name in --out")
    p.set_defaults(func=cmd_lmms_task)
    return p


def cmd_lmms_task(args: argparse.Namespace) -> int:
    from .lmms_task import write_task

    t = write_task(args.data, args.out, args.name, args.max_new_tokens, args.overwrite)
    print(f"wrote task {args.name!r} ({t['n']} questions; {', '.join(t['families'])}; answers of up to "
          f"{t['max_new_tokens']} tokens) to {t['yaml']}")
    print(f"run: lmms-eval --include_path {Path(args.out)} --tasks {args.name} --model fastllava "
          f"--model_args pretrained=MODEL", file=sys.stderr)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .. import load
    from ..extras import require
    from ..reduction import parse_spec
    from .analysis import analyze, check_reduction
    from .dataset import load_dataset

    data = load_dataset(args.data)  # fail on a bad data directory, spec or missing extra before loading weights
    if args.reduce:
        spec = parse_spec(args.reduce)
        if spec.where != "vision":
            raise UserError(f"analyze measures a fixed set of tokens through every layer; {args.reduce} cuts inside "
                            f"the LLM: use a reduction before the LLM (e.g. fastervlm:keep=64)")
    require("matplotlib", "plots", "fastllava analyze")
    model = load(args.model, **load_options(args))
    check_reduction(args.reduce, model.config)
    out = Path(args.out)
    result = analyze(model, data, reduce=args.reduce, limit=args.limit, out_dir=out, progress=not args.quiet)
    o = result["overall"]
    print(f"MDI {o['mdi']:.4f}  AEI {o['aei']:.4f} on {o['n']} questions "
          f"({o['text_tokens']:g} text, {o['visual_tokens']:g} visual tokens per question)")
    for name, r in result["families"].items():
        print(f"  {name:<10} MDI {r['mdi']:.4f}  AEI {r['aei']:.4f}  (n={r['n']})")
    print(f"analysis: {out / 'analysis.json'}, {out / 'analysis.png'}", file=sys.stderr)
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from .dataset import generate_dataset

    meta = generate_dataset(args.n, args.seed, args.out, image_size=args.image_size, families=args.families,
                            questions_per_image=args.questions_per_image, overwrite=args.overwrite,
                            variant=args.variant)
    kind = f"{meta['variant']} images of {meta['image_size']}-px tiles" if "variant" in meta else \
        f"images ({meta['image_size']} px)"
    print(f"wrote {meta['n']} questions about {meta['images']} {kind} to {args.out}")
    return 0


def _budgets(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import load
    from ..reduction import parse_list
    from .dataset import load_dataset
    from .runner import evaluate

    data = load_dataset(args.data)  # fail on a bad data directory before loading weights
    if args.keep and not args.reduce:
        raise UserError("--keep needs --reduce with the methods to sweep, e.g. --reduce fastv,visionzip")
    methods = parse_list(args.reduce) if args.reduce else []  # fail on a bad spec before loading weights
    if args.speculate:
        from ..generation.speculate import parse_speculate

        parse_speculate(args.speculate, None)  # the spec's form now; its layers once the model is loaded
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    sweeping = bool(args.keep) or len(methods) > 1
    if args.replicas and not args.ray:
        raise UserError("--replicas goes with --ray")
    if sweeping:
        from .sweep import sweep  # needs the plots extra: fails before loading weights
    if args.ray:
        from . import ray_eval

        model = args.model if args.model is None or not Path(args.model).exists() else str(Path(args.model).resolve())
        if sweeping:
            result = ray_eval.sweep_ray(model, load_options(args), data, methods, args.keep, args.replicas,
                                        args.batch_size, args.limit, out, not args.quiet,
                                        {"max_new_tokens": args.max_new_tokens, "speculate": args.speculate})
            return _print_sweep(result, out)
        results = ray_eval.evaluate_ray(model, load_options(args), data, args.replicas, args.batch_size, args.limit,
                                        out, not args.quiet, {"max_new_tokens": args.max_new_tokens,
                                                              "reduce": args.reduce, "speculate": args.speculate})
        _print_results(results, out)
        return 0
    model = load(args.model, **load_options(args))
    if sweeping:
        result = sweep(model, data, methods, args.keep, args.batch_size, args.limit, out, not args.quiet,
                       {"max_new_tokens": args.max_new_tokens, "speculate": args.speculate})
        return _print_sweep(result, out)
    results = evaluate(model, data, batch_size=args.batch_size, limit=args.limit, out_dir=out,
                       progress=not args.quiet, generate_kwargs={"max_new_tokens": args.max_new_tokens,
                                                                 "reduce": args.reduce, "speculate": args.speculate})
    _print_results(results, out)
    return 0


def _print_sweep(result: dict, out: Path) -> int:
    print((out / "sweep.md").read_text(), end="")
    for row in [result["baseline"], *result["runs"]]:
        _warn_cut(row["cut_at_max_new_tokens"], row["n"], result["max_new_tokens"], f" ({row['spec']})")
    print(f"sweep: {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}", file=sys.stderr)
    return 0 if result else 1


def _warn_cut(cut: int, n: int, max_new_tokens: int, run: str = "") -> None:
    """A warning on stderr when answers ran into --max-new-tokens (they are scored as they were cut)."""
    if cut:
        print(f"fastllava: warning: {cut} of {n} answers{run} were cut at --max-new-tokens {max_new_tokens} and "
              "scored so; give a larger --max-new-tokens", file=sys.stderr)


def _print_results(results: dict, out: Path) -> None:
    overall = results["overall"]
    print(f"accuracy {overall['accuracy']:.4f} on {overall['n']} questions"
          + (f" ({len(results['errors'])} skipped)" if results["errors"] else ""))
    for name, r in results["families"].items():
        f1 = (f", object F1 {r['object_f1']:.4f}, exact in the answer's own order {r['answer_order']:.4f}"
              if "object_f1" in r else "")
        print(f"  {name:<10} {r['accuracy']:.4f}  (n={r['n']}{f1})")
    _warn_cut(overall["cut_at_max_new_tokens"], overall["n"], results["settings"]["max_new_tokens"])
    v = results["visual_tokens"]
    print(f"visual tokens per question: {v['unreduced']:g} unreduced ({v['min']}-{v['max']}), "
          f"{v['equivalent']:g} layer-weighted in the LLM")
    print(f"results: {out / 'results.json'}", file=sys.stderr)
