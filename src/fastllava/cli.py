"""`fastllava run | data | eval | bench | serve`: the command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_args import add_model_args, add_quant_args, load_options, positive_int, utf8_text
from .errors import UserError
from .bench.commands import add_bench_parser
from .evaluation.commands import add_analyze_parser, add_data_parser, add_eval_parser, add_lmms_task_parser
from .reduction.commands import add_reduction_parsers
from .serve.command import add_serve_parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastllava", description="Fast LLaVA inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a prompt about an image, streaming the answer")
    add_model_args(run)
    add_quant_args(run)
    run.add_argument("--image", help="image file (omit for a text-only prompt)")
    run.add_argument("--video", help="video (LLaVA-OneVision, LLaVA-NeXT-Video): a folder of frame images (sorted by name), a .npy "
                                     "array [frames, height, width, 3], or an mp4/webm/gif file (needs PyAV: "
                                     "fastllava[video])")
    run.add_argument("--num-frames", type=positive_int, help="frames sampled uniformly from the video (default: "
                                                             "the checkpoint's video processor's, else 8)")
    run.add_argument("--prompt", type=utf8_text, required=True, help="the question or instruction")
    run.add_argument("--max-new-tokens", type=positive_int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int, help="seed for sampling")
    run.add_argument("--stop", type=utf8_text, action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    run.add_argument("--reduce", help="visual token reduction, NAME[:key=value,...] (see `fastllava methods`)")
    run.add_argument("--speculate", help="speculative decoding: ngram[:n=3,k=4], layerskip[:skip=A-B,k=4] or "
                                         "draft:model=DIR[,k=4,reduce=SPEC,image=0] "
                                         "(greedy output unchanged; see docs/speculative.md)")
    run.set_defaults(func=cmd_run)

    add_data_parser(sub)
    add_eval_parser(sub)
    add_analyze_parser(sub)
    add_lmms_task_parser(sub)
    add_reduction_parsers(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from . import load
    from .generation import SamplingParams
    from .images import check_num_frames, check_video_path, load_image

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, stop=args.stop)
    SamplingParams(**sampling).validate()  # fail on bad sampling options, a bad spec or image before loading weights
    if args.reduce:
        from .reduction import parse_spec

        parse_spec(args.reduce)
    if args.speculate:
        from .generation.speculate import parse_speculate

        parse_speculate(args.speculate, None)
    image = load_image(args.image) if args.image else None
    if args.num_frames is not None and not args.video:
        raise UserError("--num-frames goes with --video")
    video = None
    if args.video:
        video = str(check_video_path(args.video))
        if args.num_frames is not None:
            check_num_frames(args.num_frames)
    model = load(args.model, **load_options(args))
    kwargs = dict(**sampling, reduce=args.reduce, speculate=args.speculate)
    if video is not None:
        kwargs["num_frames"] = args.num_frames
    if args.json:
        if video is not None:
            kwargs["videos"] = [video]
        result = model.generate(images=[image], prompts=[args.prompt], **kwargs)[0]
        print(json.dumps({"model": str(model.path), "prompt": args.prompt, "text": result.text,
                          "finish_reason": result.finish_reason, "stats": result.stats}))
        return 0
    stream = model.stream(image=image, prompt=args.prompt, video=video, **kwargs)
    for delta in stream:
        print(delta, end="", flush=True)
    print(flush=True)
    s = stream.result.stats
    kept = s.get("visual_tokens", [s["image_tokens"]])
    visual = s["image_tokens"] or s.get("video_tokens")
    reduced = f" ({' -> '.join(map(str, kept))} in the LLM)" if args.reduce and visual else ""
    spec = s.get("speculate")
    drafts = (f" | drafts kept {spec['accepted_tokens']}/{spec['draft_tokens']}, {spec['tokens_per_step']:.2f} tokens "
              f"per step" if spec else "")
    videos = f" + {s['video_tokens']} video tokens" if s.get("video_tokens") else ""
    print(f"[{s['prompt_tokens']} prompt + {s['image_tokens']} image tokens{videos}{reduced}, "
          f"{s['generated_tokens']} generated"
          f" | TTFT {s['ttft_s'] * 1000:.1f} ms | decode {s['decode_tok_s']:.1f} tok/s{drafts}"
          f" | {stream.result.finish_reason}"
          + (" | compiled mode: these times include the compilation of a first run]"
             if model.decode == "compiled" else "]"), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"fastllava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastllava: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fastllava methods | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141


if __name__ == "__main__":
    sys.exit(main())
