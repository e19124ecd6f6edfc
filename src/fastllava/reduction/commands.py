"""`fastllava methods` and `fastllava inspect`: argparse sub-commands for token reduction."""

from __future__ import annotations

import argparse
import json

from ..cli_args import add_model_args, utf8_text


def add_reduction_parsers(subparsers) -> None:
    methods = subparsers.add_parser("methods", help="list the visual token reduction methods and their parameters")
    methods.set_defaults(func=cmd_methods)

    p = subparsers.add_parser("inspect", help="draw which image patches a reduction method keeps")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, type=utf8_text, help="the question (in-LLM methods depend on it)")
    p.add_argument("--reduce", required=True, help="method spec, NAME[:key=value,...] (see `fastllava methods`)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_inspect)


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import describe

    print("spec: NAME[:key=value,...]; keep = visual tokens kept per image; lists join with '-'")
    print("LLaVA-NeXT: methods before the LLM work per tile (keep is shared among the base image and the tiles,\n"
          "image_newline tokens go last); methods inside the LLM rank all visual tokens of a prompt together")
    print(describe())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .. import load
    from ..images import load_image
    from .overlay import inspect
    from .registry import parse_spec

    parse_spec(args.reduce)  # fail on a bad spec or image before loading weights
    image = load_image(args.image)
    model = load(args.model, device=args.device, dtype=args.dtype)
    print(json.dumps(inspect(model, image, args.prompt, args.reduce, args.out)))
    return 0
