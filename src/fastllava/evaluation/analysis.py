"""`fastllava analyze`: how much the answer attends to the image versus the text, per decoder layer.

The two indices come from Wu, Tang, Zheng and Jiang, "When Language Overrules: Revealing Text
Dominance in Multimodal Large Language Models" (arXiv:2508.10552, 2025). The paper's abstract
names them (Modality Dominance Index, MDI; Attention Efficiency Index, AEI) but the equations were
not available to us from the paper itself; the forms used here are the ones documented by a public
re-implementation of the paper (github.com/Song-haJo/LangOverrule) and agree with the abstract's
reading (text dominance = more attention per text token than per non-text token):

    A_T, A_O   attention mass the query puts on the text tokens T and on the visual tokens O
    MDI        = (A_T / |T|) / (A_O / |O|)   attention per text token over attention per visual token
                 (> 1: text dominates, 1: balanced, < 1: the image dominates)
    AEI (text) = P_T / Q_T, with P_T = A_T / (A_T + A_O) the text's share of that attention and
                 Q_T = |T| / (|T| + |O|) its share of the tokens (> 1: text gets more than its share)

Here the query is the one that produces the answer's first token: the last prompt token. Its
attention probabilities are read layer by layer (averaged over the heads) from the language
model's layer loop; "text" is every real prompt token that is not visual (template, question and
the query itself), "visual" the image tokens that enter the LLM (after a reduction before the LLM,
the ones it kept). Per layer, a question's values are averaged over the questions; `overall` is
the mean over layers of those. A visual mass under 1e-30 is clamped there, so values stay finite.
Reductions that cut inside the LLM are refused: the set of tokens would change from layer to layer.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import UserError
from ..generation.prefill import prepare, stage_mask
from ..ops import positions_from_mask
from ..reduction.runtime import make_reduction
from .dataset import Dataset, load_dataset
from .progress import Progress

EPS = 1e-30  # smallest attention mass and token count used as a denominator


def indices(probs: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> tuple[float, float]:
    """(MDI, AEI of the text) of one query's attention probs [S] (or [H, S]: averaged over the
    heads first) over keys of which text [S] and visual [S] (boolean) mark the two modalities."""
    if probs.dim() == 2:
        probs = probs.mean(0)
    probs = probs.double()
    n_t, n_o = int(text.sum()), int(visual.sum())
    if n_t == 0 or n_o == 0:
        raise ValueError(f"need both text and visual tokens, got {n_t} text and {n_o} visual")
    a_t = float(probs[text].sum())
    a_o = max(float(probs[visual].sum()), EPS)
    mdi = (a_t / n_t) / (a_o / n_o)
    aei = (a_t / max(a_t + a_o, EPS)) / (n_t / (n_t + n_o))
    return mdi, aei


@torch.inference_mode()
def layer_indices(model, image, prompt: str, reduction=None) -> tuple[list[float], list[float], int, int]:
    """Per-layer (MDI list, AEI list) of one question about `image`, and its (text, visual) token
    counts in the LLM. `model`: a fastllava.Llava; `reduction`: a Reduction from make_reduction or None."""
    inputs = model.inputs([image], [prompt])
    device = model.device
    input_ids = inputs["input_ids"].to(device)
    valid = inputs["attention_mask"].to(device).bool()
    positions = positions_from_mask(valid)
    pixels = inputs["pixel_values"]
    pixels = None if pixels is None else pixels.to(device)
    sizes = inputs["image_sizes"]
    inner = model.model
    x, positions, valid = prepare(inner, input_ids, pixels, valid, positions, reduction,
                                  None if sizes is None else sizes.to(device))
    if reduction is not None:
        visual, bias = reduction.visual & valid, reduction.key_bias
    else:
        visual, bias = (input_ids == model.config.image_token_index) & valid, None
    text = valid & ~visual
    lm = inner.language_model
    t = x.shape[1]
    window = model.config.text.sliding_window
    causal = bias is None and bool(valid.all()) and (window is None or t <= window)
    cos, sin = lm.rotary(positions, x.dtype)
    mask = stage_mask(inner, valid, bias, causal, x.dtype)
    mdi, aei = [], []
    for i in range(len(lm.layers)):
        x, probs, _ = lm.run(x, cos, sin, mask, None, 0, t, [i], "last")  # probs [1, H, 1, T]
        m, a = indices(probs[0, :, 0], text[0], visual[0])
        mdi.append(m)
        aei.append(a)
    return mdi, aei, int(text.sum()), int(visual.sum())


def check_reduction(spec, cfg):
    """A Reduction for `spec` (None stays None); UserError for one that cuts inside the LLM."""
    reduction = make_reduction(spec, cfg)
    if reduction is not None and (reduction.method.where != "vision" or reduction.cuts):
        raise UserError(f"analyze measures a fixed set of tokens through every layer; {reduction.method.spec()} "
                        f"cuts inside the LLM: use a reduction before the LLM (e.g. fastervlm:keep=64)")
    return reduction


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _summary(rows: list[dict]) -> dict:
    """Per-layer means over the rows' per-layer values, their mean over layers, and n."""
    layers = len(rows[0]["mdi"])
    per = {k: [_mean([r[k][i] for r in rows]) for i in range(layers)] for k in ("mdi", "aei")}
    return {"mdi": _mean(per["mdi"]), "aei": _mean(per["aei"]), "n": len(rows),
            "text_tokens": _mean([r["text_tokens"] for r in rows]),
            "visual_tokens": _mean([r["visual_tokens"] for r in rows]), "layers": per}


def analyze(model, data_dir: str | Path | Dataset, reduce=None, limit: int | None = None,
            out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """MDI and AEI of every question (per layer) of a question set; returns the analysis dict and,
    with `out_dir`, writes analysis.json and analysis.png (needs matplotlib) there."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    data = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    samples = data.samples[:limit] if limit is not None else data.samples
    if not samples:
        raise UserError(f"no usable questions in {data.root}")
    check_reduction(reduce, model.config)
    errors = list(data.errors)
    rows = []
    bar = Progress("analyze", len(samples), enabled=progress)
    for s in samples:
        try:
            mdi, aei, n_t, n_o = layer_indices(model, s.image, s.asked, check_reduction(reduce, model.config))
        except UserError as e:
            errors.append(f"questions.jsonl:{s.line}: {e}")
        else:
            rows.append({"id": s.id, "family": s.family, "mdi": mdi, "aei": aei, "text_tokens": n_t,
                         "visual_tokens": n_o})
        bar.update()
    bar.close()
    if errors:
        print(f"fastllava: warning: skipped {len(errors)} bad sample(s) in {data.root}: {errors[0]}"
              + (f"; ... ({len(errors) - 1} more)" if len(errors) > 1 else ""), file=sys.stderr)
    if not rows:
        raise UserError(f"no question in {data.root} could be analyzed; first problem: {errors[0]}")
    overall = _summary(rows)
    by_family = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r)
    families = {f: _summary(v) for f, v in sorted(by_family.items())}
    for f in families.values():
        del f["layers"]
    result = {
        "model": str(getattr(model, "path", None) or type(model).__name__),
        "overall": {k: v for k, v in overall.items() if k != "layers"},
        "families": families,
        "layers": overall["layers"],
        "settings": {
            "data": str(data.root), "reduce": None if reduce is None else str(reduce), "limit": limit,
            "query": "last prompt token", "heads": "mean",
            "aggregation": "per-layer mean over questions; overall = mean over layers",
            "definitions": {"mdi": "(A_T/|T|) / (A_O/|O|)", "aei": "(A_T/(A_T+A_O)) / (|T|/(|T|+|O|))"},
            "paper": "arXiv:2508.10552",
            "device": str(model.device),
            "dtype": str(model.model.dtype).replace("torch.", ""),
        },
        "errors": errors,
    }
    values = [result["overall"]["mdi"], result["overall"]["aei"], *result["layers"]["mdi"], *result["layers"]["aei"]]
    if not all(math.isfinite(v) for v in values):
        raise RuntimeError("analyze produced a non-finite index")  # a bug, not a user mistake
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out / "analysis.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Per-layer MDI and AEI (two panels, log-scaled MDI, the balanced value 1 dashed)."""
    from ..extras import require

    matplotlib = require("matplotlib", "plots", "fastllava analyze")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = list(range(len(result["layers"]["mdi"])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in zip(axes, ("mdi", "aei"), ("MDI (text / visual, per token)", "AEI of the text")):
        ax.plot(layers, result["layers"][key], marker="o", ms=3)
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        if key == "mdi" and min(result["layers"][key]) > 0:
            ax.set_yscale("log")
    reduce = result["settings"]["reduce"]
    fig.suptitle(f"{result['overall']['n']} questions" + (f", reduce {reduce}" if reduce else ", unreduced")
                 + f": MDI {result['overall']['mdi']:.4g}, AEI {result['overall']['aei']:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
