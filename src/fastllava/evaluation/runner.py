"""Run a model over a question set and score it: results.json (accuracy overall and per family,
visual tokens per question) and samples.jsonl (one line per scored question)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..reduction.runtime import check_fits, make_reduction
from .dataset import Dataset, Sample, load_dataset
from .progress import Progress
from .questions import ANSWER_SUFFIX, LONG_FAMILIES
from .scoring import accuracy, is_correct, object_f1

ONE_WORD_TOKENS = 8  # eval's default answer length: a one-word answer and its end
LONG_ANSWER_TOKENS = 96  # ... when the set asks for lists (describe: up to 12 objects of 5 words)


def default_max_new_tokens(samples: list[Sample]) -> int:
    """LONG_ANSWER_TOKENS when any sample is of a long-answer family (describe), else ONE_WORD_TOKENS."""
    return LONG_ANSWER_TOKENS if any(s.family in LONG_FAMILIES for s in samples) else ONE_WORD_TOKENS


def answer_kwargs(samples: list[Sample], generate_kwargs: dict | None) -> dict:
    """generate's arguments for eval: greedy unless told otherwise, and max_new_tokens when not
    given (None) by default_max_new_tokens(samples)."""
    kwargs = {"temperature": 0.0, **(generate_kwargs or {})}
    if kwargs.get("max_new_tokens") is None:
        kwargs["max_new_tokens"] = default_max_new_tokens(samples)
    return kwargs


def evaluate(model, data_dir: str | Path | Dataset, batch_size: int = 8, limit: int | None = None,
             out_dir: str | Path | None = None, progress: bool | Progress = True,
             generate_kwargs: dict | None = None) -> dict:
    """Ask `model` (a fastllava.Llava) every question, greedy by default; returns the results dict
    and, with `out_dir`, writes results.json and samples.jsonl there. `progress` may be a shared
    Progress bar (left open)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    data = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    errors = list(data.errors)
    samples = data.samples[:limit] if limit is not None else data.samples
    if not samples:
        raise UserError(f"no usable questions in {data.root}" + (f"; first problem: {errors[0]}" if errors else ""))
    kwargs = answer_kwargs(samples, generate_kwargs)
    check_budgets(model, samples, [kwargs.get("reduce")])

    rows = []
    bar = progress if isinstance(progress, Progress) else Progress("eval", len(samples), enabled=progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        for sample, result in zip(batch, _answers(model, batch, kwargs, errors), strict=True):
            if result is not None:
                rows.append(_row(sample, result))
        bar.update(len(batch))
    if bar is not progress:
        bar.close()
    return finish(model, data, rows, errors, batch_size, limit, kwargs, out_dir)


def finish(model, data: Dataset, rows: list[dict], errors: list[str], batch_size: int, limit: int | None,
           kwargs: dict, out_dir: str | Path | None, settings: dict | None = None) -> dict:
    """The results of answered rows (a warning for the skipped samples, UserError when none was
    answered), with `settings` added to theirs; with out_dir, results.json and samples.jsonl."""
    if errors:
        shown = "; ".join(errors[:3]) + (f"; ... ({len(errors) - 3} more)" if len(errors) > 3 else "")
        print(f"fastllava: warning: skipped {len(errors)} bad sample(s) in {data.root}: {shown}", file=sys.stderr)
    if not rows:
        raise UserError(f"no question in {data.root} could be answered; first problem: {errors[0]}")
    results = _summary(model, data, rows, errors, batch_size, limit, kwargs)
    results["settings"].update(settings or {})
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return results


def check_budgets(model, samples: list[Sample], specs: list) -> None:
    """UserError before any generation when a reduction's budget (spec or Method; None: no
    reduction) is more than the visual tokens of a sample's image. On LLaVA-NeXT the count depends
    on the image's size; an image that cannot be read is left to the run, which skips it."""
    methods = [make_reduction(s, model.config).method for s in specs if s is not None]
    if not methods or not model.config.is_next:
        return  # LLaVA-1.5: every image gives the same count, checked by make_reduction
    first: dict = {}  # image -> its first question
    for s in samples:
        first.setdefault(s.image, s)
    fewest = None
    for s in first.values():
        try:
            with Image.open(s.image) as im:
                tokens = model.config.image_tokens(im.height, im.width)
        except (OSError, Image.DecompressionBombError):
            continue
        if fewest is None or tokens < fewest[0]:
            fewest = (tokens, s)
    if fewest is not None:
        for m in methods:
            check_fits(m, fewest[0], f"{fewest[1].image.name} (questions.jsonl:{fewest[1].line})")


def _answers(model, batch: list[Sample], kwargs: dict, errors: list[str]) -> list:
    """Results (engine.Result) for a batch; if an image cannot be read, retry one by one so that
    only the bad sample is lost (None, recorded in `errors`)."""
    def ask(items):
        return model.generate(images=[s.image for s in items], prompts=[s.asked for s in items], **kwargs)

    try:
        return ask(batch)
    except UserError as e:
        if len(batch) == 1:
            errors.append(f"questions.jsonl:{batch[0].line}: {e}")
            return [None]
    results = []
    for s in batch:
        try:
            results.append(ask([s])[0])
        except UserError as e:
            errors.append(f"questions.jsonl:{s.line}: {e}")
            results.append(None)
    return results


def _row(sample: Sample, result) -> dict:
    """One samples.jsonl line; `image_tokens`: the image's visual tokens before any reduction,
    `visual_tokens`: those entering the LLM then left after each in-LLM cut (see engine stats);
    `finish_reason`: "length" when the answer was cut at max_new_tokens."""
    row = {"id": sample.id, "family": sample.family, "question": sample.question, "answer": sample.answer,
           "prediction": result.text, "correct": is_correct(result.text, sample.answer, sample.accepted),
           "finish_reason": result.finish_reason,
           **{k: result.stats[k] for k in ("image_tokens", "visual_tokens", "visual_tokens_equivalent")}}
    if sample.strategy is not None:
        row["strategy"] = sample.strategy
    if sample.family in LONG_FAMILIES:
        row["object_f1"] = round(object_f1(result.text, sample.answer), 4)
        row["answer_order"] = is_correct(result.text, sample.answer)  # in the answer's own order
    return row


def _token_summary(rows: list[dict]) -> dict:
    """Visual tokens per question: unreduced (mean, min, max; LLaVA-NeXT counts depend on the image
    size) and the layer-weighted mean the LLM processed (`equivalent`, see reduction.accounting)."""
    unreduced = [r["image_tokens"] for r in rows]
    return {"unreduced": round(sum(unreduced) / len(rows), 2), "min": min(unreduced), "max": max(unreduced),
            "equivalent": round(sum(r["visual_tokens_equivalent"] for r in rows) / len(rows), 2)}


def _dataset_settings(meta: dict) -> dict:
    """What results record of meta.json; the variant is "default" when a dataset names none."""
    out = {k: meta[k] for k in ("name", "version", "seed", "n", "image_size") if k in meta}
    return {**out, "variant": meta.get("variant", "default")} if meta else out


def _long_answer_scores(rows: list[dict], family: str) -> dict:
    """{"object_f1": mean, "answer_order": exact in the answer's own order} for a long-answer
    family, else {}."""
    rows = [r for r in rows if r["family"] == family and "object_f1" in r]
    if not rows:
        return {}
    return {"object_f1": sum(r["object_f1"] for r in rows) / len(rows),
            "answer_order": accuracy([r["answer_order"] for r in rows])}


def _summary(model, data: Dataset, rows: list[dict], errors: list[str], batch_size: int,
             limit: int | None, kwargs: dict) -> dict:
    from .. import __version__

    by_family = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row["correct"])
    flags = [row["correct"] for row in rows]
    settings = {
        "data": str(data.root),
        "dataset": _dataset_settings(data.meta),
        "batch_size": batch_size,
        "limit": limit,
        "max_new_tokens": kwargs["max_new_tokens"],
        "generate": {k: v for k, v in kwargs.items() if k != "max_new_tokens"},
        "answer_suffix": ANSWER_SUFFIX,
        "device": str(getattr(model, "device", "unknown")),
        "dtype": str(getattr(getattr(model, "model", None), "dtype", "unknown")).replace("torch.", ""),
        "weights": str(getattr(model, "weights", None) or "fp"),
        "kv_cache": str(getattr(getattr(model, "runner", None), "kv_cache", None) or "fp"),
        "decode": getattr(model, "decode", "eager"),
        "fastllava_version": __version__,
    }
    return {
        "model": str(getattr(model, "path", None) or type(model).__name__),
        "overall": {"accuracy": accuracy(flags), "n": len(flags),
                    "cut_at_max_new_tokens": sum(row["finish_reason"] == "length" for row in rows)},
        "families": {f: {"accuracy": accuracy(v), "n": len(v), **_long_answer_scores(rows, f)}
                     for f, v in sorted(by_family.items())},
        "visual_tokens": _token_summary(rows),
        "settings": settings,
        "errors": errors,
    }
