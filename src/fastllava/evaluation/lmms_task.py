"""`fastllava lmms-task --data DIR --out DIR`: a shapes question set as a local lmms-eval task, run
with `lmms-eval --include_path OUT --tasks NAME` (any lmms-eval model: `fastllava`, `openai`, ...).

The folder holds:
    NAME.yaml    the task: `dataset_path: json` over NAME.jsonl, greedy generation of at most
                 max_new_tokens (by default eval's: 8, or 96 when the set holds describe questions) with
                 no stop string, an `accuracy` metric, one `<family>_accuracy` per family in the set
                 and `describe_object_f1` (eval's object F1) when it holds describe questions
    NAME.jsonl   the questions eval would score (load_dataset's samples: bad lines left out), each
                 with its image's absolute path, `prompt` (the exact text eval asks) and
                 `accepted` (other answers scored correct: describe's side-by-side objects swapped)
    utils.py     doc_to_visual (the image, RGB), doc_to_text (the prompt), process_results (scored
                 by fastllava.evaluation.scoring.is_correct, as eval scores)
so every route asks the same text with the same image and scores the answer the same way.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import UserError
from .dataset import load_dataset
from .questions import FAMILIES, LONG_FAMILIES
from .runner import default_max_new_tokens

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

UTILS = '''"""The lmms-eval task written by `fastllava lmms-task`: the question's exact prompt with its
image, the answer scored as `fastllava eval` scores it."""

from PIL import Image

from fastllava.evaluation.questions import LONG_FAMILIES
from fastllava.evaluation.scoring import is_correct, object_f1


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    text = results[0] if isinstance(results[0], str) else str(results[0])
    score = float(is_correct(text, doc["answer"], doc.get("accepted") or ()))
    out = {"accuracy": score, doc["family"] + "_accuracy": score}
    if doc["family"] in LONG_FAMILIES:  # and eval's object F1, rounded as in its samples.jsonl
        out[doc["family"] + "_object_f1"] = round(object_f1(text, doc["answer"]), 4)
    return out
'''


def write_task(data_dir: str | Path, out_dir: str | Path, name: str = "shapes",
               max_new_tokens: int | None = None, overwrite: bool = False) -> dict:
    """Write the task folder (NAME.yaml, NAME.jsonl, utils.py); returns {"yaml", "n", "families", "skipped",
    "max_new_tokens"}. max_new_tokens None: eval's default for the set (runner.default_max_new_tokens)."""
    if not NAME.fullmatch(name):
        raise UserError(f"task name {name!r} must be a letter then letters, digits or underscores")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    data = load_dataset(data_dir)
    if not data.samples:
        first = f"; first problem: {data.errors[0]}" if data.errors else ""
        raise UserError(f"no usable questions in {data.root}{first}")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(data.samples)
    out = Path(out_dir).expanduser()
    yaml_path = out / f"{name}.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is not a directory")
    if yaml_path.exists() and not overwrite:
        raise UserError(f"{yaml_path} already exists; choose another --out or --name, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    families = [f for f in FAMILIES if any(s.family == f for s in data.samples)]
    families += sorted({s.family for s in data.samples} - set(families))
    with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
        for s in data.samples:
            f.write(json.dumps({"id": s.id, "image": str(s.image), "prompt": s.asked, "answer": s.answer,
                                "accepted": list(s.accepted), "family": s.family, "strategy": s.strategy or ""}, ensure_ascii=False) + "\n")
    (out / "utils.py").write_text(UTILS)
    yaml_path.write_text(_yaml(name, (out / f"{name}.jsonl").resolve(), data.root, max_new_tokens, families))
    if data.errors:
        print(f"fastllava: warning: left out {len(data.errors)} bad line(s) of {data.root / 'questions.jsonl'}: "
              f"{data.errors[0]}", file=sys.stderr)
    return {"yaml": yaml_path, "n": len(data.samples), "families": families, "skipped": len(data.errors),
            "max_new_tokens": max_new_tokens}


def _yaml(name: str, questions: Path, source: Path, max_new_tokens: int, families: list[str]) -> str:
    names = ["accuracy"] + [f"{f}_{m}" for f in families for m in ("accuracy", "object_f1")
                            if m == "accuracy" or f in LONG_FAMILIES]
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in names)
    return (f"# written by `fastllava lmms-task` from {source}\n"
            f"# run: lmms-eval --include_path {questions.parent} --tasks {name} --model ...\n"
            f"task: {name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    test: {json.dumps(str(questions))}\n"
            f"test_split: test\n"
            f"output_type: generate_until\n"
            f"doc_to_visual: !function utils.doc_to_visual\n"
            f"doc_to_text: !function utils.doc_to_text\n"
            f"doc_to_target: answer\n"
            f"generation_kwargs:\n"
            f"  max_new_tokens: {max_new_tokens}\n"
            f"  temperature: 0\n"
            f"  do_sample: false\n"
            f"  until: []\n"
            f"process_results: !function utils.process_results\n"
            f"metric_list:\n{metrics}"
            f"metadata:\n"
            f"  version: 1\n")
