"""The long-answer `describe` family and the `dense` variant of the shapes benchmark: answers list
every object from left to right in one fixed form, object-level F1 scores partial lists, eval
reports both, and adding the family's words keeps every earlier word's token id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastllava.cli import main
from fastllava.errors import UserError
from fastllava.evaluation import generate_dataset
from fastllava.evaluation.dataset import load_dataset
from fastllava.evaluation.questions import (DESCRIBE_QUESTION, ORDER_MARGIN, VOCABULARY, accepted_orders, ask_describe,
                                            describe, prompt)
from fastllava.evaluation.scenes import VARIANTS, Scene, random_scene
from fastllava.evaluation.scoring import is_correct, object_f1, objects
from fastllava.evaluation.tokenizer import TEMPLATE_WORDS, default_words
from fastllava.evaluation.questions import PUNCTUATION


def test_describe_lists_every_object_left_to_right():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = random_scene(rng, "dense")
        text = describe(scene)
        assert sum(objects(text).values()) == len(scene.objects)
        named = [tuple(part.split()[-3:]) for part in text.replace(" and ", ", ").split(", ")]
        by_x = sorted(scene.objects, key=lambda o: o.x)
        assert named == [(o.size, o.color, o.shape) for o in by_x]
    one = Scene.from_dict({"objects": [{"shape": "star", "color": "red", "size": "small", "x": 0.5, "y": 0.5,
                                        "radius": 0.07}], "background": "plain", "background_level": 200,
                           "texture_seed": 0})
    assert describe(one) == "a small red star"


def _scene(*xs: float) -> Scene:
    """Small circles of the colors red, green, blue, ... at the given centres x, one above another."""
    colors = ["red", "green", "blue", "yellow"]
    return Scene.from_dict({"objects": [{"shape": "circle", "color": colors[i], "size": "small", "x": x,
                                         "y": 0.2 + 0.2 * i, "radius": 0.07} for i, x in enumerate(xs)],
                            "background": "plain", "background_level": 200, "texture_seed": 0})


def test_side_by_side_objects_may_be_listed_in_either_order():
    clear = ask_describe(_scene(0.3, 0.7), np.random.default_rng(0))
    assert clear.answer == "a small red circle and a small green circle" and clear.accepted == ()
    close = ask_describe(_scene(0.51, 0.5), np.random.default_rng(0))
    assert close.answer == "a small green circle and a small red circle"
    assert close.accepted == ("a small red circle and a small green circle",)
    assert is_correct("A small red circle and a small green circle.", close.answer, close.accepted)
    assert not is_correct("a small red circle and a small green circle", close.answer)
    # near ties chain without becoming one: red and blue are clearly apart, so blue never precedes red
    step = ORDER_MARGIN * 0.6
    orders = accepted_orders(_scene(0.5, 0.5 + step, 0.5 + 2 * step))
    assert sorted(orders) == [[0, 1, 2], [0, 2, 1], [1, 0, 2]] and orders[0] == [0, 1, 2]
    assert len(accepted_orders(_scene(0.5, 0.5, 0.5, 0.5), limit=5)) == 6  # 4! = 24 orders, capped


def test_accepted_answers_travel_with_the_set(tmp_path):
    generate_dataset(60, 11, tmp_path / "d", image_size=32, families=["describe"], progress=False, variant="dense")
    data = load_dataset(tmp_path / "d")
    with_others = [s for s in data.samples if s.accepted]
    assert with_others and all(s.answer not in s.accepted for s in with_others)
    assert all(sorted(objects(a).elements()) == sorted(objects(s.answer).elements())
               for s in with_others for a in s.accepted)
    lines = (tmp_path / "d" / "questions.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["accepted"] = "a small red circle"
    (tmp_path / "d" / "questions.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    bad = load_dataset(tmp_path / "d")
    assert bad.errors == ["questions.jsonl:1: field 'accepted' must be a list of strings"]
    assert len(bad.samples) == len(data.samples) - 1


def test_object_f1():
    truth = "a small red circle, a large blue star and a small green square"
    assert object_f1(truth, truth) == 1.0
    assert object_f1("A small red circle and a small green square.", truth) == pytest.approx(0.8)
    assert object_f1("a large red circle", truth) == 0.0
    assert object_f1("", truth) == 0.0
    assert object_f1("a small red circle, a small red circle", "a small red circle") == pytest.approx(2 / 3)


def test_dense_scenes_are_crowded():
    rng = np.random.default_rng(0)
    counts = [len(random_scene(rng, "dense").objects) for _ in range(40)]
    lo, hi = VARIANTS["dense"].objects
    assert min(counts) >= lo and max(counts) <= hi and lo >= 7


def test_long_answer_words_come_after_the_others():
    words = default_words()
    assert words[:len(words) - 3] == list(dict.fromkeys([*TEMPLATE_WORDS, *PUNCTUATION, *VOCABULARY]))
    assert set(DESCRIBE_QUESTION.lower().rstrip(".").split()) <= set(words)


def test_a_describe_set_and_its_eval_report(tmp_path, capsys):
    meta = generate_dataset(12, 5, tmp_path / "d", image_size=64, families=["describe", "color"],
                            questions_per_image=2, progress=False, variant="dense")
    rows = [json.loads(line) for line in (tmp_path / "d" / "questions.jsonl").read_text().splitlines()]
    described = [r for r in rows if r["family"] == "describe"]
    assert meta["variant"] == "dense" and len(described) == 6
    assert all(r["prompt"] == DESCRIBE_QUESTION == r["question"] for r in described)
    assert all(r["prompt"] == prompt(r["question"]) for r in rows if r["family"] == "color")
    assert main(["eval", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--max-new-tokens", "24",
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    f1 = results["families"]["describe"]["object_f1"]
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert f1 == pytest.approx(np.mean([s["object_f1"] for s in samples if s["family"] == "describe"]))
    in_order = [s["answer_order"] for s in samples if s["family"] == "describe"]
    assert results["families"]["describe"]["answer_order"] == pytest.approx(np.mean(in_order))
    asked = {r["id"]: r for r in rows}
    assert all(s["correct"] == is_correct(s["prediction"], s["answer"], asked[s["id"]].get("accepted", []))
               for s in samples)
    assert "object F1" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown question families"):
        generate_dataset(4, 0, tmp_path / "x", families=["describes"], progress=False)


def test_eval_gives_describe_room_to_answer_by_default(tmp_path, capsys):
    """Without --max-new-tokens eval answers a set with describe questions in up to 96 tokens (8 would cut
    every list of two or more objects) and a one-word set in up to 8; a given value wins, and answers
    it cuts are counted and warned about."""
    generate_dataset(6, 4346, tmp_path / "d", families=["describe"], progress=False)
    generate_dataset(6, 4346, tmp_path / "w", families=["color"], progress=False)
    runs = {"d": [], "w": [], "d8": ["--max-new-tokens", "8"]}
    results, warned = {}, {}
    for name, extra in runs.items():
        assert main(["eval", "--data", str(tmp_path / name[0]), "--out", str(tmp_path / f"r{name}"), "--quiet", *extra]) == 0
        results[name] = json.loads((tmp_path / f"r{name}" / "results.json").read_text())
        warned[name] = "were cut at --max-new-tokens 8" in capsys.readouterr().err
    assert [results[n]["settings"]["max_new_tokens"] for n in runs] == [96, 8, 8]
    cut = {n: results[n]["overall"]["cut_at_max_new_tokens"] for n in runs}
    samples = [json.loads(line) for line in (tmp_path / "rd8" / "samples.jsonl").read_text().splitlines()]
    assert cut["d"] == cut["w"] == 0 and cut["d8"] == sum(s["finish_reason"] == "length" for s in samples) >= 3
    assert warned == {"d": False, "w": False, "d8": True}
    described, cut = results["d"]["families"]["describe"], results["d8"]["families"]["describe"]
    assert described["object_f1"] >= 0.8 and described["object_f1"] > cut["object_f1"] + 0.2
