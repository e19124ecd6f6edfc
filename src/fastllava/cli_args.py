"""Argument types and options shared by the sub-commands."""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    return _int_from(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_from(text, 0, "an integer >= 0")


def _int_from(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def utf8_text(value: str) -> str:
    """A string argument that is valid UTF-8: bytes that are not arrive from argv as lone
    surrogates (os.fsdecode), which a tokenizer or a JSON answer would choke on."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{os.fsencode(value)!r} is not valid UTF-8") from None
    return value


DEVICES = ("cpu", "cuda")  # what fastllava runs on (torch also parses meta, xla, mps, ...)


def device(value: str) -> str:
    kind, colon, index = value.strip().partition(":")
    if kind not in DEVICES or (colon and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


DECODE_HELP = ("decode steps: eager (default), static (fixed shapes) or compiled (torch.compile; CUDA graphs on a "
               "GPU); see fastllava.generation.runner")


def add_model_args(p: argparse.ArgumentParser, decode_help: str = DECODE_HELP) -> None:
    """--model, --device, --dtype, --decode (with its help text)."""
    p.add_argument("--model", help="checkpoint directory (HF LLaVA format), or default-next for the embedded "
                   "LLaVA-NeXT model; default: the embedded LLaVA-1.5 model")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--decode", help=decode_help)  # checked by fastllava.load (generation.check_decode_mode)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """--weights, --kv-cache (see fastllava.quant)."""
    p.add_argument("--weights", help="weight-only quantization: fp (default), int8[:vision=1], "
                                     "int4[:group=128,vision=1]")
    p.add_argument("--kv-cache", help="KV-cache layout: fp (default), kivi[:bits=4,group=32,residual=128], "
                                      "vidkv[:group=32,residual=128,high=0.5,salient=0]")


def load_options(args: argparse.Namespace) -> dict:
    """fastllava.load's keyword arguments from add_model_args' and add_quant_args' options."""
    return dict(device=args.device, dtype=args.dtype, weights=args.weights, kv_cache=args.kv_cache,
                decode=args.decode)
