"""Argument types and options shared by the sub-commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype."""
    p.add_argument("--model", help="checkpoint directory (HF LLaVA format); default: the embedded model")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
