"""lmms-eval's own CLI, offline, on the local task `fastllava lmms-task` makes from a shapes set:
`--model fastllava` (the plugin) and `--model openai` against a fastllava server started here both
give `fastllava eval`'s predictions and scores on the same questions (the embedded model, 20
questions on small tiles, where it gets some wrong). lmms-eval is a test dependency (scripts/setup.sh
installs the lmms extra): without it these tests fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastllava
from fastllava.assets import default_model_dir
from fastllava.cli import main
from fastllava.evaluation import evaluate, generate_dataset
from fastllava.evaluation.scoring import is_correct, object_f1
from fastllava.serve.settings import Settings
from serve_helpers import running_server

N, SEED, IMAGE_SIZE = 20, 6, 48  # the embedded model answers 12 of these 20 right


@pytest.fixture(scope="module")
def llava():
    return fastllava.load(str(default_model_dir()), device="cpu")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_cli")
    generate_dataset(N, SEED, root / "data", image_size=IMAGE_SIZE, progress=False)
    assert main(["lmms-task", "--data", str(root / "data"), "--out", str(root / "task")]) == 0
    return root


@pytest.fixture(scope="module")
def reference(llava, shapes):
    """`fastllava eval`'s results and its samples (predictions in question order)."""
    results = evaluate(llava, shapes / "data", batch_size=8, out_dir=shapes / "eval", progress=False)
    samples = [json.loads(x) for x in (shapes / "eval" / "samples.jsonl").read_text().splitlines()]
    assert 0 < results["overall"]["accuracy"] < 1  # a set the model gets partly wrong: the scoring matters
    return results, samples


def _lmms_eval(shapes: Path, out: Path, model_args: list[str], env: dict | None = None) -> tuple[dict, list[dict]]:
    """Run `python -m lmms_eval ... --tasks shapes --log_samples` offline; (results of the task, samples by doc)."""
    cmd = [sys.executable, "-m", "lmms_eval", *model_args, "--include_path", str(shapes / "task"),
           "--tasks", "shapes", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(shapes / "hf-datasets"), "WANDB_MODE": "disabled",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=shapes, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    [results_file] = out.rglob("*_results.json")
    [samples_file] = out.rglob("*_samples_shapes.jsonl")
    samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"]["shapes"], samples


def _same_as_eval(got: tuple[dict, list[dict]], reference) -> None:
    results, samples = got
    expected, rows = reference
    assert [s["filtered_resps"] for s in samples] == [r["prediction"] for r in rows]
    assert [s["target"] for s in samples] == [r["answer"] for r in rows]
    assert [s["input"] for s in samples] == [fastllava.evaluation.prompt(r["question"]) for r in rows]
    assert [s["accuracy"] for s in samples] == [float(r["correct"]) for r in rows]
    assert results["accuracy,none"] == pytest.approx(expected["overall"]["accuracy"])
    for family, r in expected["families"].items():
        assert results[f"{family}_accuracy,none"] == pytest.approx(r["accuracy"]), family


def test_lmms_eval_with_the_plugin_scores_as_eval(shapes, reference, tmp_path):
    got = _lmms_eval(shapes, tmp_path / "out", ["--model", "fastllava", "--model_args",
                                                f"pretrained={default_model_dir()}", "--batch_size", "8",
                                                "--device", "cpu"])
    _same_as_eval(got, reference)


def test_lmms_eval_openai_against_the_server_scores_as_eval(llava, shapes, reference, tmp_path):
    with running_server(llava, Settings(model_id="default_model", max_batch_size=8)) as url:
        got = _lmms_eval(shapes, tmp_path / "out", [
            "--model", "openai",
            "--model_args", "model_version=default_model,num_concurrent=8,timeout=120,max_retries=1"],
            env={"OPENAI_API_KEY": "unused", "OPENAI_API_BASE": f"{url}/v1"})
    _same_as_eval(got, reference)


def test_the_task_folder(shapes, reference):
    yaml = (shapes / "task" / "shapes.yaml").read_text()
    assert "dataset_path: json" in yaml and "!function utils.process_results" in yaml
    assert "max_new_tokens: 8" in yaml and "until: []" in yaml  # eval's generation: greedy, 8 tokens, no stop
    docs = [json.loads(x) for x in (shapes / "task" / "shapes.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == [r["id"] for r in reference[1]]
    assert all(Path(d["image"]).is_absolute() and Path(d["image"]).is_file() for d in docs)
    utils = _utils(shapes / "task")
    for doc, row in zip(docs, reference[1]):  # the task's metric on eval's predictions is eval's score
        assert utils.doc_to_text(doc) == fastllava.evaluation.prompt(row["question"])
        assert utils.process_results(doc, [row["prediction"]]) == {
            "accuracy": float(row["correct"]), f"{row['family']}_accuracy": float(row["correct"])}


def _utils(task: Path):
    spec = importlib.util.spec_from_file_location(f"utils_{abs(hash(task))}", task / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_long_answer_family_gets_eval_object_f1(tmp_path):
    generate_dataset(4, 2, tmp_path / "data", image_size=48, families=["describe", "color"], progress=False)
    assert main(["lmms-task", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "task")]) == 0
    yaml = (tmp_path / "task" / "shapes.yaml").read_text()  # a set with describe: eval's 96 tokens by default
    assert "max_new_tokens: 96" in yaml and "metric: describe_object_f1" in yaml and "color_object_f1" not in yaml
    utils = _utils(tmp_path / "task")
    doc = next(json.loads(x) for x in (tmp_path / "task" / "shapes.jsonl").read_text().splitlines()
               if json.loads(x)["family"] == "describe")
    half = doc["answer"].split(", ")[0]  # the first object only
    for said in (doc["answer"], half, "nothing"):
        got = utils.process_results(doc, [said])
        assert got["describe_object_f1"] == round(object_f1(said, doc["answer"]), 4)
        assert got["accuracy"] == got["describe_accuracy"] == float(is_correct(said, doc["answer"]))
    swapped = {**doc, "accepted": [half]}  # an accepted other answer scores as the answer does
    assert utils.process_results(swapped, [half])["accuracy"] == 1.0


def _error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line(shapes, tmp_path, capsys):
    data = str(shapes / "data")
    nowhere = str(tmp_path / "nope")
    assert "does not exist" in _error(capsys, ["lmms-task", "--data", nowhere, "--out", str(tmp_path / "t")])
    assert "task name" in _error(capsys, ["lmms-task", "--data", data, "--out", str(tmp_path / "t"), "--name", "a-b"])
    assert "already exists" in _error(capsys, ["lmms-task", "--data", data, "--out", str(shapes / "task")])
    (tmp_path / "file").write_text("")
    assert "not a directory" in _error(capsys, ["lmms-task", "--data", data, "--out", str(tmp_path / "file")])
