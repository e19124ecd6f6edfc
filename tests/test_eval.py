"""Scoring, reading question sets (with bad lines), and evaluating a tiny random LLaVA end to end."""

import argparse
import json
import shutil

import pytest
import torch

import fastllava
from fastllava.errors import UserError
from fastllava.evaluation import evaluate, generate_dataset, is_correct, load_dataset, normalize
from fastllava.evaluation.commands import add_data_parser, add_eval_parser
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words, write_preprocessor_config
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

N = 18  # questions in the test dataset (6 images)


@pytest.mark.parametrize("text, expected", [
    ("  Yes.", "yes"), ("RED!", "red"), ("Three", "3"), ("3.", "3"), ("zero", "0"), ("ten", "10"),
    ("left,\n", "left"), ("  no  ", "no"), ("", ""), ("a  big\tred", "a big red"),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_match_after_normalization():
    assert is_correct("Two.", "2")
    assert is_correct(" circle ", "Circle")
    assert not is_correct("reddish", "red")
    assert not is_correct("red circle", "red")
    assert not is_correct("", "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    generate_dataset(N, 5, path, image_size=64, progress=False)
    return path


def _with_bad_lines(src, dst):
    """A copy of dataset `src` whose questions.jsonl gains four bad lines (7, 10, 11, 13) and a blank one."""
    dst.mkdir()
    (dst / "images").symlink_to(src / "images")
    lines = (src / "questions.jsonl").read_text().splitlines()
    missing_image = dict(json.loads(lines[0]), id="x-missing", image="images/nope.png")
    bad = {5: "{not json", 8: json.dumps({"id": "x-noanswer", "image": "images/000000.png", "question": "q?",
                                          "family": "color"}),
           9: json.dumps(missing_image), 11: "[1, 2]"}
    for index in sorted(bad):
        lines.insert(index, bad[index])
    lines.insert(3, "")  # blank lines are skipped, not errors
    (dst / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_load_dataset_reads_every_sample(dataset):
    data = load_dataset(dataset)
    assert len(data.samples) == N and data.errors == []
    assert data.meta["n"] == N
    assert all(s.image.is_file() and s.family and s.answer for s in data.samples)


def test_bad_lines_are_reported_and_the_rest_kept(dataset, tmp_path):
    data = load_dataset(_with_bad_lines(dataset, tmp_path / "bad"))
    assert len(data.samples) == N
    assert data.errors == [
        "questions.jsonl:7: malformed JSON",
        "questions.jsonl:10: missing field answer",
        "questions.jsonl:11: image images/nope.png not found",
        "questions.jsonl:13: expected a JSON object, got list",
    ]


def test_missing_directory_or_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no questions.jsonl"):
        load_dataset(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        load_dataset(tmp_path / "f")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread; busy cores make torch's thread pool crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_checkpoint(tiny_llava(seed=11), tmp_path_factory.mktemp("ckpt"))
    build_word_tokenizer(default_words(), IMAGE_TOKEN, VOCAB).save(str(path / "tokenizer.json"))
    write_preprocessor_config(path, 32)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return fastllava.load(checkpoint, device="cpu", dtype="float32")


def test_word_tokenizer_layout():
    tok = build_word_tokenizer(default_words(), IMAGE_TOKEN, VOCAB)
    vocab = tok.get_vocab()
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<image>"]) == (0, 1, 2, IMAGE_TOKEN)
    assert max(vocab.values()) < VOCAB and len(set(vocab.values())) == len(vocab)
    ids = tok.encode("USER: <image>\nWhat color is the star? ASSISTANT:").ids
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN) == 1 and 0 not in ids
    with pytest.raises(ValueError, match="do not fit"):
        build_word_tokenizer([f"w{i}" for i in range(200)], IMAGE_TOKEN, VOCAB)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_results_and_samples(model, checkpoint, dataset, tmp_path, capsys):
    data = _with_bad_lines(dataset, tmp_path / "bad")
    out = tmp_path / "run"
    results = evaluate(model, data, batch_size=5, out_dir=out, progress=False)
    assert "skipped 4 bad sample(s)" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results) == {"model", "overall", "families", "visual_tokens", "settings", "errors"}
    assert results["visual_tokens"] == {"unreduced": 16, "min": 16, "max": 16, "equivalent": 16}
    assert results["model"] == str(checkpoint)
    assert results["overall"]["n"] == N and len(results["errors"]) == 4
    assert results["errors"][0] == "questions.jsonl:7: malformed JSON"
    assert sum(f["n"] for f in results["families"].values()) == N
    assert set(results["families"]) == {s.family for s in load_dataset(dataset).samples}
    settings = results["settings"]
    assert (settings["batch_size"], settings["limit"], settings["max_new_tokens"]) == (5, None, 8)
    assert (settings["device"], settings["dtype"], settings["data"]) == ("cpu", "float32", str(data))
    assert settings["fastllava_version"] == fastllava.__version__

    samples = _lines(out / "samples.jsonl")
    assert len(samples) == N
    expected = {s.id: s for s in load_dataset(dataset).samples}
    assert {s["id"] for s in samples} == set(expected)
    for s in samples:
        assert s["answer"] == expected[s["id"]].answer and s["question"] == expected[s["id"]].question
        assert s["correct"] == is_correct(s["prediction"], s["answer"])
    accuracy = sum(s["correct"] for s in samples) / N
    assert results["overall"]["accuracy"] == pytest.approx(accuracy)
    for name, f in results["families"].items():
        rows = [s for s in samples if s["family"] == name]
        assert f["n"] == len(rows) and f["accuracy"] == pytest.approx(sum(s["correct"] for s in rows) / len(rows))

    # answers set to every other prediction, shouted: scored correct through normalization only
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    (relabelled / "images").symlink_to(dataset / "images")
    rows = _lines(dataset / "questions.jsonl")
    predicted = {s["id"]: s["prediction"] for s in samples}
    for row in rows[::2]:
        row["answer"] = f" {predicted[row['id']].upper()}!"
    (relabelled / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = evaluate(model, relabelled, batch_size=8, out_dir=tmp_path / "relabelled-run", progress=False)
    assert scored["overall"] == {"accuracy": 0.5, "n": N,  # a random model never stops: every answer cut
                                 "cut_at_max_new_tokens": sum(s["finish_reason"] == "length" for s in samples)}
    rescored = _lines(tmp_path / "relabelled-run" / "samples.jsonl")
    assert [s["correct"] for s in rescored] == [i % 2 == 0 for i in range(N)]

    # batching does not change greedy answers; limit keeps the first questions
    again = evaluate(model, dataset, batch_size=1, limit=7, out_dir=tmp_path / "again", progress=False)
    assert again["overall"]["n"] == 7 and again["errors"] == []
    assert again["settings"]["dataset"] == {"name": "shapes", "version": 2, "seed": 5, "n": N, "image_size": 64,
                                            "variant": "default"}
    first = _lines(tmp_path / "again" / "samples.jsonl")
    assert [s["id"] for s in first] == [s.id for s in load_dataset(dataset).samples[:7]]
    assert all(predicted[s["id"]] == s["prediction"] for s in first)


def test_unreadable_image_loses_only_its_questions(model, dataset, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(dataset, data)
    (data / "images" / "000001.png").write_bytes(b"not a png")
    hit = [s.line for s in load_dataset(data).samples[:9] if s.image.name == "000001.png"]
    results = evaluate(model, data, batch_size=4, limit=9, progress=False)
    assert len(hit) == 3 and results["overall"]["n"] == 9 - len(hit)
    assert [e.split(": ")[0] for e in results["errors"]] == [f"questions.jsonl:{n}" for n in hit]
    assert all("not an image" in e for e in results["errors"])
    (data / "images" / "000000.png").write_bytes(b"")  # the first three questions' image
    with pytest.raises(UserError, match="could be answered"):
        evaluate(model, data, limit=3, progress=False)


def _parser():
    parser = argparse.ArgumentParser(prog="test")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    add_eval_parser(sub)
    return parser


def test_commands(checkpoint, tmp_path, capsys):
    parser = _parser()
    data = tmp_path / "d"
    args = parser.parse_args(["data", "shapes", "--n", "12", "--seed", "3", "--out", str(data), "--image-size", "48"])
    assert args.func(args) == 0
    assert len((data / "questions.jsonl").read_text().splitlines()) == 12
    assert json.loads((data / "meta.json").read_text())["image_size"] == 48
    with pytest.raises(UserError, match="already holds a dataset"):
        args.func(args)

    args = parser.parse_args(["eval", "--model", str(checkpoint), "--data", str(data), "--batch-size", "4",
                              "--limit", "6", "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    assert "on 6 questions" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "results.json").read_text())["overall"]["n"] == 6

    args = parser.parse_args(["eval", "--model", str(checkpoint), "--data", str(tmp_path / "none")])
    with pytest.raises(UserError, match="does not exist"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "shapes", "--n", "0", "--out", str(tmp_path / "z")])
