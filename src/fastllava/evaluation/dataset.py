"""Writing a shapes dataset to disk and reading a question set back.

Layout of a dataset directory:
    images/000123.png     one rendered scene each
    questions.jsonl       {"id", "image", "question", "prompt", "answer", "family"[, "strategy"]} per line
                          ("prompt": the exact text the model is asked, the question and the answer
                          instruction; sets written before it lack it, and eval asks
                          questions.prompt(question), the same text)
    scenes.jsonl          {"image", "caption", "scene"} per image (for captioning / alignment)
    meta.json             {"name", "version", "seed", "n", "image_size", ...[, "variant"]}

`image_size` is the side of one tile in pixels: the default variant's images are one tile, the
"hires" variant's canvases 2-4 tiles (see scenes.VARIANTS); meta.json names the variant unless
it is the default (so that default datasets are byte-identical to those made before hires).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .progress import Progress
from .questions import (ALL_FAMILIES, ANSWER_SUFFIX, ASK, ASK_LONG, FAMILIES, STRATEGIES, Question, all_pairs,
                        ask_exist, prompt)
from .scenes import VARIANTS, Scene, caption, random_scene, render

DATASET_NAME = "shapes"
DATASET_VERSION = 2  # 2: describe questions carry "accepted" (side-by-side objects in either order)
REQUIRED_FIELDS = ("id", "image", "question", "answer", "family")


def generate_dataset(n: int, seed: int, out_dir: str | Path, image_size: int = 336,
                     families: list[str] | None = None, questions_per_image: int = 3,
                     progress: bool = True, overwrite: bool = False, variant: str = "default") -> dict:
    """Write `n` questions about freshly rendered scenes of `variant` ("default" or "hires") to
    `out_dir`; returns meta.json's content. The same arguments give byte-identical files."""
    families = _check_args(n, image_size, families, questions_per_image, variant)
    out = Path(out_dir).expanduser()
    if (out / "questions.jsonl").exists() and not overwrite:
        raise UserError(f"{out} already holds a dataset; choose another output directory or pass --overwrite")
    (out / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.Generator(np.random.PCG64(seed))
    per_image = min(questions_per_image, len(families))
    scenes = [random_scene(rng, variant) for _ in range(math.ceil(n / per_image))]
    popular = _popular(scenes)  # frequencies over the planned scenes

    asked = Counter({f: 0 for f in families})
    exist_turn = 0
    questions, scene_lines = [], []
    bar = Progress("shapes", n, enabled=progress)
    index = 0
    while len(questions) < n:
        if index == len(scenes):  # a few scenes could not take every family
            scenes.append(random_scene(rng, variant))
        scene = scenes[index]
        picked: list[Question] = []
        for family in sorted(families, key=lambda f: (asked[f], ALL_FAMILIES.index(f))):
            if len(picked) == per_image or len(questions) + len(picked) == n:
                break
            if family == "exist":
                strategy, answer = _exist_plan(exist_turn)
                q = ask_exist(scene, rng, answer, strategy, popular)
                exist_turn += q is not None
            else:
                q = {**ASK, **ASK_LONG}[family](scene, rng)
            if q is not None:
                picked.append(q)
                asked[family] += 1
        if picked:
            image = f"images/{index:06d}.png"
            render(scene, image_size).save(out / image)
            scene_lines.append({"image": image, "caption": caption(scene), "scene": scene.to_dict()})
            for k, q in enumerate(picked):
                row = {"id": f"{index:06d}-{k}", "image": image, "question": q.question,
                       "prompt": prompt(q.question, q.family), "answer": q.answer, "family": q.family}
                if q.strategy is not None:
                    row["strategy"] = q.strategy
                if q.accepted:
                    row["accepted"] = list(q.accepted)
                questions.append(row)
            bar.update(len(picked))
        index += 1
    bar.close()

    _write_jsonl(out / "questions.jsonl", questions)
    _write_jsonl(out / "scenes.jsonl", scene_lines)
    meta = {"name": DATASET_NAME, "version": DATASET_VERSION, "seed": seed, "n": n, "image_size": image_size,
            "images": len(scene_lines), "families": list(families), "questions_per_image": per_image,
            "answer_suffix": ANSWER_SUFFIX}
    if variant != "default":
        meta["variant"] = variant
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _check_args(n, image_size, families, questions_per_image, variant) -> tuple[str, ...]:
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"the number of questions must be a positive integer, got {n!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise UserError(f"image size must be an integer of at least 32 pixels, got {image_size!r}")
    if questions_per_image < 1:
        raise UserError(f"questions per image must be at least 1, got {questions_per_image}")
    if families is None:
        return FAMILIES
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown or not families:
        raise UserError(f"unknown question families {unknown}; choose from {', '.join(ALL_FAMILIES)}")
    return tuple(dict.fromkeys(families))


def _exist_plan(turn: int) -> tuple[str, str]:
    """Cycle strategy x answer so that every strategy gets as many yes as no."""
    return STRATEGIES[(turn // 2) % len(STRATEGIES)], ("yes", "no")[turn % 2]


def _popular(scenes: list[Scene]) -> list[tuple[str, str]]:
    """(colour, shape) pairs by the number of scenes holding them, most frequent first."""
    held = Counter(p for s in scenes for p in {(o.color, o.shape) for o in s.objects})
    order = all_pairs()
    return sorted(order, key=lambda p: (-held[p], order.index(p)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- reading ----

@dataclass(frozen=True)
class Sample:
    id: str
    image: Path  # absolute
    question: str
    answer: str
    family: str
    strategy: str | None
    line: int  # 1-based line in questions.jsonl
    prompt: str | None = None  # the exact text asked (questions.jsonl's "prompt"); None: prompt(question)
    accepted: tuple[str, ...] = ()  # other answers scored correct (questions.jsonl's "accepted")

    @property
    def asked(self) -> str:
        """What the model is asked: the line's "prompt", or for older sets the question and the
        answer instruction (questions.prompt)."""
        return self.prompt if self.prompt is not None else prompt(self.question, self.family)


@dataclass
class Dataset:
    root: Path
    samples: list[Sample]
    errors: list[str] = field(default_factory=list)  # "questions.jsonl:17: malformed JSON", ...
    meta: dict = field(default_factory=dict)


def load_dataset(data_dir: str | Path) -> Dataset:
    """Read `data_dir/questions.jsonl`. A missing directory or file raises UserError; a bad line or
    a missing image becomes an entry in `errors` and the other samples are kept."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UserError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the directory that holds questions.jsonl")
    file = root / "questions.jsonl"
    if not file.is_file():
        raise UserError(f"no questions.jsonl in {root}; create a dataset with `fastllava data shapes --out {root}`")
    samples, errors, seen = [], [], set()
    with file.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{file.name}:{number}"
            try:
                sample = _parse(raw, number, root)
            except ValueError as e:
                errors.append(f"{where}: {e}")
                continue
            if sample is None:
                continue
            if sample.id in seen:
                errors.append(f"{where}: duplicate id {sample.id!r}")
                continue
            seen.add(sample.id)
            samples.append(sample)
    meta = {}
    if (root / "meta.json").exists():
        try:
            meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            errors.append("meta.json: malformed JSON (ignored)")
        meta = meta if isinstance(meta, dict) else {}
    return Dataset(root, samples, errors, meta)


def _parse(raw: bytes, number: int, root: Path) -> Sample | None:
    """One line -> Sample, None for a blank line; ValueError says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("malformed JSON") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in REQUIRED_FIELDS[1:]:
        if not isinstance(row[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise ValueError(f"field 'id' must be a string or an integer, got {type(row['id']).__name__}")
    image = root / row["image"]
    if not image.is_file():
        raise ValueError(f"image {row['image']} not found")
    if row.get("prompt") is not None and not isinstance(row["prompt"], str):
        raise ValueError(f"field 'prompt' must be a string, got {type(row['prompt']).__name__}")
    accepted = row.get("accepted", [])
    if not isinstance(accepted, list) or not all(isinstance(a, str) for a in accepted):
        raise ValueError("field 'accepted' must be a list of strings")
    strategy = row.get("strategy")
    return Sample(str(row["id"]), image.resolve(), row["question"], row["answer"], row["family"],
                  strategy if isinstance(strategy, str) else None, number, row.get("prompt"), tuple(accepted))
