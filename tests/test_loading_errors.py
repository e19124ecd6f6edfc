"""Bad checkpoints and bad CLI input: one clear line, exit code 2, no traceback."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastllava
from fastllava.errors import UserError
from hf_reference import save_checkpoint, tiny_llava


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_checkpoint(tiny_llava(seed=5), tmp_path_factory.mktemp("good"), "new")


def _copy(good, tmp_path, name="ckpt"):
    dst = tmp_path / name
    dst.mkdir()
    for f in good.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _one_line_error(path, match):
    with pytest.raises(UserError, match=match) as e:
        fastllava.load(path, device="cpu")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_directory(tmp_path):
    _one_line_error(tmp_path / "nope", "does not exist")


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _one_line_error(tmp_path, "no model.safetensors")


def test_pickles_refused(tmp_path, good):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    _one_line_error(d, "never unpickles")


def test_truncated_safetensors(tmp_path, good):
    d = _copy(good, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(d, "model.safetensors")


def test_wrong_shape_names_the_tensor(tmp_path, good):
    d = _copy(good, tmp_path)
    state = load_file(d / "model.safetensors")
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    state[key] = torch.zeros(3, 5)
    save_file(state, str(d / "model.safetensors"))
    msg = _one_line_error(d, "shape")
    assert key in msg and "[3, 5]" in msg


def test_missing_and_unexpected_tensors_are_named(tmp_path, good):
    d = _copy(good, tmp_path)
    state = load_file(d / "model.safetensors")
    state.pop("model.language_model.norm.weight")
    save_file(state, str(d / "model.safetensors"))
    assert "language_model.norm.weight" in _one_line_error(d, "lacks tensor")
    state = load_file(good / "model.safetensors")
    state["model.language_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    assert "model.language_model.extra.weight" in _one_line_error(d, "unexpected tensor")


def test_bad_config(tmp_path, good):
    d = _copy(good, tmp_path)
    (d / "config.json").write_text("{not json")
    _one_line_error(d, "not valid JSON")
    cfg = json.loads((good / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(d, "unsupported text model")


def test_shard_missing(tmp_path):
    d = save_checkpoint(tiny_llava(seed=6), tmp_path / "sharded", "original", shards=2)
    next(d.glob("model-00002-*.safetensors")).unlink()
    _one_line_error(d, "missing")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastllava.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_errors_exit_2_without_traceback(tmp_path, good):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    d = _copy(good, tmp_path, "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])
    cases = [
        (["run", "--model", str(tmp_path / "missing"), "--prompt", "hi"], "does not exist"),
        (["run", "--model", str(good), "--image", str(tmp_path / "zero.png"), "--prompt", "hi"], "empty"),
        (["run", "--model", str(good), "--image", str(tmp_path / "text.png"), "--prompt", "hi"], "not an image"),
        (["run", "--model", str(d), "--prompt", "hi"], "not a valid safetensors"),
        (["run", "--model", str(good), "--prompt", "hi"], "tokenizer.json"),
        (["run", "--model", str(good), "--prompt", "hi", "--max-new-tokens", "0"], "positive integer"),
        (["eval", "--model", str(good), "--data", str(tmp_path / "no-data")], "does not exist"),
        (["data", "shapes", "--n", "-3", "--out", str(tmp_path / "d")], "positive integer"),
        (["data", "shapes", "--n", "3", "--out", str(tmp_path / "d"), "--families", "colour"], "unknown famil"),
    ]
    for args, words in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert words in r.stderr, (words, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
