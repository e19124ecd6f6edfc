"""`fastllava eval --ray --replicas 2` on a local Ray cluster writes what plain `eval` writes: the
same predictions (samples.jsonl byte for byte) and the same results.json, bad samples included,
which only gains the Ray settings; a sweep on Ray gives the plain sweep's accuracies (without
prefill times, which are measured in one process). Ray is a test dependency
(scripts/setup.sh installs the ray extra): without it this fails."""

from __future__ import annotations

import json

import pytest

from fastllava.cli import main
from fastllava.evaluation import generate_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "data"
    generate_dataset(20, 6, path, image_size=48, progress=False)  # the embedded model gets 12 of 20 right
    (path / "images" / "000002.png").write_text("not a png")  # its 2 questions are skipped, in the retry path
    with (path / "questions.jsonl").open("a") as f:
        f.write("{not json\n")
    return path


def test_ray_eval_equals_eval(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    common = ["eval", "--data", str(data), "--batch-size", "4", "--quiet"]  # 5 batches over 2 replicas
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain_out = capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", "--replicas", "2"]) == 0
    assert capsys.readouterr().out == plain_out
    assert (tmp_path / "ray" / "samples.jsonl").read_bytes() == (tmp_path / "plain" / "samples.jsonl").read_bytes()
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    ray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert ray["settings"].pop("ray") == {"replicas": 2, "address": "local"}
    assert ray == plain
    assert 0 < plain["overall"]["accuracy"] < 1 and plain["overall"]["n"] == 18 and len(plain["errors"]) == 3


def _error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_ray_refusals_are_one_line(data, tmp_path, capsys):
    common = ["eval", "--data", str(data), "--out", str(tmp_path / "x"), "--quiet"]
    assert "--replicas goes with --ray" in _error(capsys, [*common, "--replicas", "2"])
    assert "budget 9999" in _error(capsys, [*common, "--ray", "--reduce", "fastv,pool", "--keep", "64,9999"])
    # a bad model or spec fails in the driver, before the cluster starts
    assert "no model.safetensors" in _error(capsys, [*common, "--ray", "--model", str(data)])
    assert "budget 9999" in _error(capsys, [*common, "--ray", "--reduce", "fastv:keep=9999"])
    assert not (tmp_path / "x").exists()


def test_ray_sweep_equals_the_sweep(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    common = ["eval", "--data", str(data), "--batch-size", "8", "--quiet", "--reduce", "fastv:layer=1,pool",
              "--keep", "16"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", "--replicas", "2"]) == 0
    capsys.readouterr()
    plain = json.loads((tmp_path / "plain" / "sweep.json").read_text())
    ray = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    keys = ("label", "spec", "keep", "accuracy", "retained", "n", "families", "visual_tokens_equivalent")
    assert [[r[k] for k in keys] for r in [ray["baseline"], *ray["runs"]]] == \
        [[r[k] for k in keys] for r in [plain["baseline"], *plain["runs"]]]
    assert len(ray["runs"]) == 2 and all(r["prefill_ms"] is None for r in ray["runs"])
    for run in ("none", "pool_keep=16,positions=original"):
        assert (tmp_path / "ray" / "runs" / run / "samples.jsonl").read_bytes() == \
            (tmp_path / "plain" / "runs" / run / "samples.jsonl").read_bytes()
    assert "prefill time not measured" in (tmp_path / "ray" / "sweep.md").read_text()
