#!/usr/bin/env python
"""Train the embedded default model and write it as a HF LLaVA checkpoint.

    python -m training.train_default_model --out src/fastllava/assets/default_model [--device cuda]

(from the repository root). Every TrainSpec field is a flag (--steps, --align-steps, --batch-size,
--lr, --seed, sizes...). The training-only heads go to training.trainer.heads_path(--out):
training/heads/<name>.safetensors for an embedded model's directory, else beside the checkpoint.
"""

import argparse
import dataclasses
import sys

from fastllava.errors import UserError
from training.trainer import TrainSpec, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--init", help="continue training from this checkpoint (one this script wrote)")
    for f in dataclasses.fields(TrainSpec):
        flag = isinstance(f.default, bool)
        kind = dict(action=argparse.BooleanOptionalAction) if flag else dict(type=type(f.default))
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kind)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        import torch

        torch.set_float32_matmul_precision("high")  # TF32 matrix products
    spec = TrainSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSpec)})
    try:
        out = train(args.out, spec, device=args.device, log=lambda m: print(m, flush=True), init=args.init)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
