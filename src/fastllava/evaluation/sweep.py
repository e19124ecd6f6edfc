"""`fastllava eval --reduce fastv,visionzip --keep 192,128,64`: accuracy of each reduction method
at each budget against the unreduced model, with the prefill's FLOPs and its measured time, as
JSON, a markdown table and a PNG plot. On a set with long-answer (`describe`) questions each run
also carries their object F1, which the table shows beside the accuracy: a list that loses one
object of six is wrong by exact match but scores F1 0.91.

The prefill time is measured apart from the evaluation, on the set's first TIMED_QUESTIONS
questions as one batch with one new token (images encoded, the reduction, the language model's
prefill), the fastest of TIMED_REPEATS runs after a warm-up: the same work for every run, so
that runs compare on one machine.

Visual token counts come from each question's generation stats, so they hold for LLaVA-NeXT too,
whose images give as many tokens as their size asks for (the unreduced count is then a mean)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..extras import require
from ..reduction.runtime import make_reduction
from .dataset import Dataset, load_dataset
from .progress import Progress
from .runner import answer_kwargs, check_budgets, evaluate

TIMED_QUESTIONS = 8
TIMED_REPEATS = 3
UNTIMED = {"prefill_gflops": None, "prefill_ms": None, "timed_questions": 0}

# sweep.png needs matplotlib: checked on import, which `fastllava eval` does before loading weights
require("matplotlib", "plots", "a sweep (fastllava eval --keep, or several --reduce methods)")


def plan(model, methods, keeps: list[int] | None) -> list[tuple[str, object]]:
    """(label, Method) to run: each method at each budget (or as given), checked against the
    model; the label is the method's spec without keep and the parameters left at their defaults."""
    runs = [replace(m, keep=k) for m in methods for k in keeps] if keeps else list(methods)
    return [(m.label(), make_reduction(m, model.config).method) for m in runs]


# (generate kwargs, the run's output folder or None, the sweep's progress bar) -> evaluate's results
RunOne = Callable[[dict, Path | None, Progress], dict]


def sweep(model, data_dir, methods, keeps: list[int] | None = None, batch_size: int = 8,
          limit: int | None = None, out_dir: str | Path | None = None, progress: bool = True,
          generate_kwargs: dict | None = None) -> dict:
    """Evaluate the unreduced model, then every method at every budget, with one progress bar;
    with out_dir, write sweep.json, sweep.md, sweep.png and each run's results under runs/. Every
    budget is checked against every image before anything runs."""
    data = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    timed = data.samples[:min(len(data.samples), limit or len(data.samples), TIMED_QUESTIONS)]

    def run(kwargs: dict, run_dir: Path | None, bar: Progress) -> dict:
        return {**evaluate(model, data, batch_size, limit, run_dir, bar, kwargs),
                "prefill": prefill_cost(model, timed, kwargs.get("reduce"))}

    return run_sweep(model, data, methods, keeps, limit, out_dir, progress, generate_kwargs, run)


def run_sweep(model, data: Dataset, methods, keeps: list[int] | None, limit: int | None,
              out_dir: str | Path | None, progress: bool, generate_kwargs: dict | None, run: RunOne) -> dict:
    """The sweep of `methods` x `keeps` with `run` evaluating each (see sweep); `model` needs only
    `config` (and `path`, for the record). A run's results may carry "prefill" (prefill_cost);
    without it the run's prefill fields are None (not measured)."""
    runs = plan(model, methods, keeps)
    n = min(len(data.samples), limit) if limit else len(data.samples)
    check_budgets(model, data.samples[:n], [method for _, method in runs])
    out = Path(out_dir).expanduser() if out_dir is not None else None
    generate_kwargs = answer_kwargs(data.samples[:n], generate_kwargs)  # one answer length for every run
    rows = []
    with Progress("sweep", n * (len(runs) + 1), enabled=progress) as bar:
        for label, method in [("none", None), *runs]:
            name = method.spec() if method else "none"
            kwargs = dict(generate_kwargs or {}, reduce=name if method else None)
            res = run(kwargs, out / "runs" / name.replace(":", "_") if out else None, bar)
            tokens = res["visual_tokens"]  # per question: unreduced and layer-weighted (see runner)
            rows.append({"method": method.name if method else "none", "label": label, "spec": name,
                         "keep": method.keep if method else tokens["unreduced"],
                         "visual_tokens_equivalent": tokens["equivalent"],
                         **res.get("prefill", UNTIMED),
                         "accuracy": res["overall"]["accuracy"], "n": res["overall"]["n"],
                         "cut_at_max_new_tokens": res["overall"]["cut_at_max_new_tokens"],
                         "families": {f: r["accuracy"] for f, r in res["families"].items()},
                         **_object_f1(res["families"])})
    base = rows[0]["accuracy"]
    for r in rows:
        r["retained"] = round(100 * r["accuracy"] / base, 2) if base else None
    result = {"model": str(getattr(model, "path", "")), "data": str(data.root), "n": n,
              "variant": data.meta.get("variant", "default"), "visual_tokens": rows[0]["keep"],
              "max_new_tokens": generate_kwargs["max_new_tokens"],
              "baseline": rows[0], "runs": rows[1:]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "sweep.md").write_text(table(result))
        plot(result, out / "sweep.png")
    return result


def _object_f1(families: dict) -> dict:
    """{"object_f1": {family: mean object F1}} for the long-answer families of a run, else {}."""
    f1 = {f: round(r["object_f1"], 4) for f, r in families.items() if "object_f1" in r}
    return {"object_f1": f1} if f1 else {}


def _f1_note(row: dict) -> str:
    """', describe F1 0.953' for each long-answer family of a sweep row ('' without one)."""
    return "".join(f", {f} F1 {v:.3f}" for f, v in sorted(row.get("object_f1", {}).items()))


def prefill_cost(model, samples: list, reduce: str | None) -> dict:
    """`prefill_gflops` (per question, from the generation stats) and `prefill_ms` (the batch of
    `samples`, one new token, fastest of TIMED_REPEATS after a warm-up) of one run."""
    def once():
        return model.generate(images=[s.image for s in samples], prompts=[s.asked for s in samples],
                              max_new_tokens=1, reduce=reduce)

    try:
        once()  # warm-up
    except UserError:  # an image eval skips: no timing
        return dict(UNTIMED)
    times, results = [], None
    for _ in range(TIMED_REPEATS):
        results = once()
        times.append(results[0].stats["ttft_s"])
    flops = sum(r.stats["prefill_flops"] for r in results) / len(results)
    return {"prefill_gflops": float(f"{flops / 1e9:.4g}"), "prefill_ms": round(1000 * min(times), 2),
            "timed_questions": len(samples)}


def table(result: dict) -> str:
    """Markdown: one row per method, one column per budget, 'accuracy (retained %), prefill ms'
    (with long-answer questions 'accuracy (retained %), describe F1 0.953, prefill ms')."""
    keeps = sorted({r["keep"] for r in result["runs"]}, reverse=True)
    cells: dict[str, dict[int, str]] = {}
    for r in result["runs"]:
        kept = f"{r['retained']:.1f}%" if r["retained"] is not None else "n/a"
        ms = f"{r['prefill_ms']:g} ms" if r["prefill_ms"] is not None else "n/a"
        cells.setdefault(r["label"], {})[r["keep"]] = f"{r['accuracy']:.3f} ({kept}){_f1_note(r)}, {ms}"
    b = result["baseline"]
    legend = "cells: accuracy (% of unreduced)" + (", object F1" if "object_f1" in b else "")
    timing = (f", prefill {b['prefill_ms']} ms for {b['timed_questions']} questions ({b['prefill_gflops']} GFLOPs "
              f"each); {legend}, prefill time of the same {b['timed_questions']} questions"
              if b["prefill_ms"] is not None else f"; {legend}, prefill time not measured")
    lines = [f"unreduced ({result['visual_tokens']:g} visual tokens per question): accuracy {b['accuracy']:.3f}"
             f"{_f1_note(b)} on {result['n']} questions{timing}", "",
             "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
             "|---|" + "---|" * len(keeps)]
    for name, row in cells.items():
        lines.append(f"| {name} | " + " | ".join(row.get(k, "") for k in keeps) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Retained accuracy (%) against visual tokens kept per image, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cost) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    lines: dict[str, list] = {}
    for r in result["runs"]:
        lines.setdefault(r["label"], []).append(r)
    for i, (name, runs) in enumerate(lines.items()):
        # matplotlib's 10 colours, then dashed and with other markers: every method tells apart
        style = dict(color=f"C{i % 10}", linestyle="-" if i < 10 else "--", marker="osD^v<>ph*"[i // 10 % 10],
                     label=name)
        runs = sorted(runs, key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in runs], [r["retained"] or 0 for r in runs], **style)
        timed = [r for r in runs if r["prefill_ms"] is not None]
        cost.plot([r["prefill_ms"] for r in timed], [r["retained"] or 0 for r in timed], **style)
    base = result["baseline"]
    if base["prefill_ms"] is not None:
        cost.plot([base["prefill_ms"]], [100], marker="*", markersize=12, color="black", linestyle="", label="none")
    cost.set_xlabel(f"prefill time of {base['timed_questions']} questions (ms)")
    cost.set_ylabel("accuracy retained (% of unreduced)")
    cost.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    keeps = sorted({r["keep"] for r in result["runs"]})
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("accuracy retained (% of unreduced)")
    ax.set_title(f"{Path(result['model']).name or 'model'}: {result['n']} questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
