#!/usr/bin/env python
"""What a model knows where it answers a position question: linear probes on the hidden state at
the answer position after each language-model layer.

    python scripts/diagnose_position.py [--model DIR] [--batches 40]

Prints the first-token accuracy on fresh position questions (split into "Which side ...?" and
yes/no ones), the attention mass that the first guided layer's heads 0 and 1 put on the two
named objects, and, per layer, how well a linear probe (fitted on 70% of the questions, scored on
the rest) reads the named objects' grid columns, their relative direction and the side word a
yes/no question asks about. It found that v3 had the direction (85-93%) but not the side word
(~chance) at the answer, hence the side-word guidance in training/guidance.py.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the `training` package

import fastllava
from fastllava.evaluation.questions import FAMILIES
from training.trainer import Batches, packed_logits, training_processor


@torch.enable_grad()
def probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear probe x [N, D] -> y [N] (labels < 0 left out)."""
    x, y = x[y >= 0], y[y >= 0]
    k = int(0.7 * len(y))
    x = (x - x[:k].mean(0)) / (x[:k].std(0) + 1e-5)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x[:k] @ w + b, y[:k]) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    return ((x[k:] @ w + b).argmax(-1) == y[k:]).float().mean().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded model)")
    parser.add_argument("--batches", type=int, default=40, help="batches of 16 questions (default 40)")
    parser.add_argument("--layer", type=int, default=1, help="the first guided layer (training's --guide-layer)")
    args = parser.parse_args()
    llava = fastllava.load(args.model, device="cpu")
    model, cfg = llava.model.eval(), llava.model.cfg
    data = Batches(llava.prompts, training_processor(cfg), cfg.vision.image_size, seed=999, questions=1,
                   grid=cfg.vision.grid)
    data.family_weights.copy_(torch.tensor([float(f == "position") for f in FAMILIES]))
    layers = range(cfg.text.num_hidden_layers)
    hidden = {i: [] for i in layers}
    mass, attrs, dirs, sides, right = [], [], [], [], []
    for _ in range(args.batches):
        b = data.batch(16)
        logits, _, taps = packed_logits(model, b, tuple(layers))
        rows, pos = b.guide_at.unbind(-1)
        image = slice(b.image_start, b.image_start + b.guide_mask.shape[-1])
        for i in layers:
            hidden[i].append(taps[i][1][rows, pos])  # [N, D]
        probs = taps[args.layer][0][:, :, image]  # [N, H, P]
        mass.append(torch.stack([(probs[:, h] * b.guide_mask[:, h]).sum(-1) for h in (0, 1)], 1))
        attrs.append(b.guide_attrs)
        dirs.append(b.guide_dirs)
        sides.append(b.guide_side[:, 1])
        right.append(logits[rows, pos].argmax(-1) == b.targets[rows, pos])
    attrs, dirs, sides, right = torch.cat(attrs), torch.cat(dirs), torch.cat(sides), torch.cat(right)
    yes_no = sides >= 0
    print(f"{len(right)} position questions; first-token accuracy {right.float().mean():.3f} "
          f"(which-side {right[~yes_no].float().mean():.3f}, yes/no {right[yes_no].float().mean():.3f})")
    print("attention mass of layer", args.layer, "heads 0/1 on the first/second named object:",
          [round(v, 3) for v in torch.cat(mass).mean(0).tolist()])
    for i in layers:
        h = torch.cat(hidden[i])
        print(f"after layer {i}: column of first {probe(h, attrs[:, 0, 2], 12):.3f}, "
              f"of second {probe(h, attrs[:, 1, 2], 12):.3f}, left/right {probe(h, dirs[:, 0], 2):.3f}, "
              f"above/below {probe(h, dirs[:, 1], 2):.3f}, side word asked {probe(h[yes_no], sides[yes_no], 4):.3f}")


if __name__ == "__main__":
    main()
