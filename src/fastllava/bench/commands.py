"""`fastllava bench ...`: the argparse sub-command."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..cli_args import add_model_args, add_quant_args, load_options, positive_int
from ..errors import UserError
from ..evaluation.progress import Progress
from .presets import PRESETS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time to first token, decode speed and memory; optionally vs transformers")
    add_model_args(p, "decode modes, comma-separated, timed one after the other on the same weights (eager, "
                      "static, compiled; e.g. eager,compiled; default eager)")
    add_quant_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="random weights at a real model's shapes instead of --model (no download)")
    p.add_argument("--keep", type=_int_list, help="visual tokens kept per image (per video frame with --frames), "
                   "comma-separated (e.g. 576,192,64; default: all); values below all use --reduce")
    p.add_argument("--reduce", help="token-reduction method (a spec; its keep is replaced by each --keep budget) for "
                   "--keep budgets (default fastervlm; divprune with --frames, whose pooled frames have no "
                   "class-token attention)")
    p.add_argument("--batch-size", type=_int_list, default=[1], help="comma-separated batch sizes (default 1)")
    p.add_argument("--text-tokens", type=positive_int, default=40, help="text tokens per prompt (default 40)")
    p.add_argument("--frames", type=positive_int, metavar="N",
                   help="time a video of N frames (random pixels) as each prompt's input instead of an image "
                        "(LLaVA-OneVision and LLaVA-NeXT-Video models)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per case; medians are reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per case first (default 2)")
    p.add_argument("--speculate", action="append", default=[], metavar="SPEC",
                   help="also time each decode mode with this speculative decoding (repeatable; e.g. ngram, "
                        "layerskip:k=4): decode tok/s with and without it, same tokens checked, drafts accepted")
    p.add_argument("--compare", choices=["hf"], help="also time transformers on the same weights and inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--profile", action="store_true", help="also run each case once under torch.profiler and "
                   "write its costliest operators and kernels to profile-<decode>-b<batch>-v<tokens>.txt")
    p.add_argument("--out", default="bench-results", help="directory for bench.json, bench.md, bench.png")

    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..generation import Runner, check_decode_mode
    from ..generation.speculate import parse_speculate
    from ..images import check_num_frames
    from ..quant import parse_kv_cache, parse_weights
    from ..reduction.registry import parse_spec
    from ..reduction.runtime import check_videos, make_reduction
    from .measure import Case, hf_twin, time_hf, time_ours, video_tokens
    from .report import environment, table, write

    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    modes = [check_decode_mode(m.strip()) for m in (args.decode or "eager").split(",")]
    if len(set(modes)) < len(modes):
        raise UserError(f"--decode lists a mode twice: {args.decode}")
    if args.preset and args.model:
        raise UserError("give --preset or --model, not both")
    weights, kv_cache = parse_weights(args.weights), parse_kv_cache(args.kv_cache)  # fail before building
    if args.compare and (weights or kv_cache):
        raise UserError("--compare hf times transformers on the same weights: leave out --weights and --kv-cache")
    if any(parse_speculate(sp, None).kind == "draft" for sp in args.speculate):  # before building a model
        raise UserError("bench times ngram and layerskip; time a draft model with `fastllava eval --speculate`")
    if args.frames is not None:
        check_num_frames(args.frames)
        if args.compare:
            raise UserError("--frames times our video path; --compare hf does not take videos yet")
    model, name = _model(args, weights)
    if args.frames is not None and not model.cfg.takes_videos:
        raise UserError(f"--frames needs a model that takes videos (LLaVA-OneVision, LLaVA-NeXT-Video); "
                        f"{name} (model_type {model.cfg.model_type!r}) does not")
    speculations = [None] + [parse_speculate(sp, model.cfg.text.num_hidden_layers) for sp in args.speculate]
    # the visual tokens a budget applies to: one image's, or one video frame's
    n_img = model.cfg.frame_tokens if args.frames else video_tokens(model, Case(1, None))
    keeps = args.keep or [n_img]
    too_many = [k for k in keeps if k > n_img]
    if too_many:
        raise UserError(f"--keep {too_many[0]} is more than the {n_img} visual tokens of "
                        f"{'a video frame' if args.frames else 'an image'}")
    method = parse_spec(args.reduce or ("divprune" if args.frames else "fastervlm"))  # e.g. fastervlm:merge=prop
    specs = {k: None if k == n_img else replace(method, keep=k).spec() for k in keeps}
    for spec in specs.values():
        reduction = make_reduction(spec, model.cfg)  # a bad method or budget fails before any timing
        if args.frames and reduction is not None:
            check_videos(reduction.method)
    hf = hf_twin(model) if args.compare == "hf" else None
    cases, theirs_by_batch, first_tokens = [], {}, {}
    out = Path(args.out).expanduser()
    report = {"model": name, "dtype": str(model.dtype).replace("torch.", ""), "environment": environment(model.device),
              "settings": {"text_tokens": args.text_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                           "frames": args.frames,
                           "warmup": args.warmup, "reduce": method.label(), "seed": args.seed,
                           "weights": str(weights or "fp"), "kv_cache": str(kv_cache or "fp"),
                           "decode": ",".join(modes), "speculate": args.speculate},
              "cases": cases}
    variants = [(mode, spec) for mode in modes for spec in speculations]
    with Progress("bench", len(variants) * len(keeps) * len(args.batch_size)) as bar:
        for mode, spec in variants:
            runner = Runner(model, mode, kv_cache)
            label = mode if spec is None else f"{mode} {spec.spec()}"
            for batch in args.batch_size:
                for keep in sorted(set(keeps), reverse=True):
                    case = Case(batch, None if keep == n_img else keep, args.text_tokens, args.new_tokens, args.frames)
                    reduce = specs[keep]
                    ours = time_ours(runner, case, reduce, args.repeats, args.warmup, spec)
                    row = {"batch": batch, "visual_tokens": _visual_tokens(model, case), "decode": label,
                           "reduce": reduce, "ours": _plain(ours)}
                    if len(variants) > 1:  # the greedy tokens of the first mode, for the same case
                        first = first_tokens.setdefault((batch, keep), ours["tokens"])
                        row["same_tokens_as_first_decode"] = bool(torch.equal(ours["tokens"], first))
                    if hf is not None and case.keep is None:
                        if batch not in theirs_by_batch:  # transformers is timed once per batch size
                            theirs_by_batch[batch] = time_hf(hf, model, case, args.repeats, args.warmup)
                        row.update(_comparison(ours, theirs_by_batch[batch]))
                    cases.append(row)
                    write(out, report, plot=False)  # what is done survives an interrupted run
                    if args.profile:
                        name = f"profile-{mode}{'-spec' + str(speculations.index(spec)) if spec else ''}-b{batch}-v{keep}"
                        (out / f"{name}.txt").write_text(_profile(runner, case, reduce, spec))
                    bar.update(1)
    files = write(out, report)
    print(table(cases))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def _model(args: argparse.Namespace, weights):
    """(the model to time, its name): a preset's shapes with random weights, or a loaded checkpoint."""
    if not args.preset:
        from .. import load

        llava = load(args.model, **{**load_options(args), "decode": None})
        return llava.model, str(llava.path)
    from ..checkpoint import resolve_device, resolve_dtype
    from ..quant.weights import quantize_weights
    from .presets import preset_config, random_model

    device = resolve_device(args.device)
    model = random_model(preset_config(args.preset), device, resolve_dtype(args.dtype, device), args.seed)
    quantize_weights(model, weights)
    return model, f"preset {args.preset}"


def _comparison(ours: dict, theirs: dict) -> dict:
    """A case's transformers fields: its timings, the ratios (their time over ours, our decode speed
    over theirs) and whether the greedy tokens are the same."""
    import torch

    return {"hf": _plain(theirs),
            "ratios": {"ttft": theirs["ttft_s"] / ours["ttft_s"], "e2e": theirs["e2e_s"] / ours["e2e_s"],
                       "decode": ours["decode_tok_s"] / theirs["decode_tok_s"]},
            "same_tokens": bool(torch.equal(ours["tokens"], theirs["tokens"]))}


def _profile(runner, case, reduce, spec=None) -> str:
    """profile_ours' table, or why the profiler failed (a diagnostic extra must not end the run)."""
    from .measure import profile_ours

    try:
        return profile_ours(runner, case, reduce, speculate=spec)
    except Exception as e:  # noqa: BLE001 - e.g. a profiler without device support: say so, keep timing
        return f"profiling failed: {type(e).__name__}: {e}\n"


def _visual_tokens(model, case) -> int:
    """The visual tokens of one prompt entering the LLM: an image's budget, or a video's (its
    frames' budgets; unreduced, its own count)."""
    from .measure import video_tokens

    if not case.frames:
        return case.keep or video_tokens(model, case)
    return case.keep * case.frames if case.keep else video_tokens(model, case)


def _plain(timing: dict) -> dict:
    return {k: v for k, v in timing.items() if k != "tokens"}

