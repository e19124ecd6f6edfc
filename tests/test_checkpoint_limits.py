"""Absurd checkpoints fail fast: a bad config.json (not a regular file, too big, not JSON, sizes
that are not sane integers), a model too big for memory, weights that are not floats or not
finite: each a one-line UserError naming the file and the field or tensor, in seconds, without
allocating the model (and through the CLI: exit code 2, one line, no traceback)."""

import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastllava
from fastllava import checkpoint
from fastllava.cli import main
from fastllava.errors import UserError
from hf_reference import PINPOINTS, save_checkpoint, tiny_llava

LIMIT_S = 10  # CPU seconds: every refusal below takes well under this (wall time varies with the load)
GROWTH_KB = 1 << 20  # and the process's peak memory grows by less than 1 GiB (ru_maxrss is in KiB)
KEY = "model.language_model.layers.1.self_attn.k_proj.weight"  # a tensor of the tiny checkpoint


@pytest.fixture(autouse=True)
def _deadline():
    """A hang (reading a FIFO or /dev/zero) fails the test instead of blocking the run."""
    def expire(*_):
        raise TimeoutError("no answer within 120 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_checkpoint(tiny_llava(seed=5), tmp_path_factory.mktemp("good"), "new")


@pytest.fixture(scope="module")
def good_next(tmp_path_factory):
    return save_checkpoint(tiny_llava(seed=5, pinpoints=PINPOINTS), tmp_path_factory.mktemp("next"), "new")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _with_config(src, dst, edit):
    """A copy of checkpoint `src` whose config.json went through edit(cfg dict)."""
    d = _copy(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _refused(path, *words, dtype="float32"):
    """fastllava.load(path) fails with a one-line UserError holding `words`, fast and without
    growing the process's peak memory by GBs, and so does the CLI's `run` (exit code 2, that line
    on stderr); -> the message."""
    rss, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.process_time()
    with pytest.raises(UserError) as e:
        fastllava.load(path, device="cpu", dtype=dtype)
    elapsed = time.process_time() - start
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), (words, msg)
    assert elapsed < LIMIT_S, (elapsed, msg)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < GROWTH_KB, msg
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", "--model", str(path), "--device", "cpu", "--dtype", dtype, "--prompt", "hi"])
    line = stderr.getvalue()  # the same message (free memory may change in between)
    assert code == 2 and line.startswith("fastllava: error: ") and line.count("\n") == 1, line
    assert all(w in line for w in words), (words, line)
    return msg


# --- config.json: what the file is ---------------------------------------------------------------

def test_config_that_is_not_a_regular_file(tmp_path, good):
    for kind, make in (("a directory", lambda p: p.mkdir()), ("a FIFO", os.mkfifo),
                       ("a device", lambda p: p.symlink_to("/dev/zero"))):
        d = _copy(good, tmp_path / kind.split()[-1])
        (d / "config.json").unlink()
        make(d / "config.json")
        _refused(d, str(d / "config.json"), kind)


def test_weights_that_are_not_a_regular_file(tmp_path, good):
    d = _copy(good, tmp_path / "fifo")
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    _refused(d, str(d / "model.safetensors"), "a FIFO")
    d = _copy(good, tmp_path / "index")
    (d / "model.safetensors.index.json").symlink_to("/dev/zero")
    _refused(d, "model.safetensors.index.json", "a device")


@pytest.mark.parametrize("text, words", [
    (" " * (2 << 20), ["larger than 1 MiB"]),  # a regular but oversized file: only 1 MiB is read
    ("[" * 100_000 + "]" * 100_000, ["not valid JSON"]),  # nesting deeper than the parser's recursion
    ("1" * 5000, ["not valid JSON"]),  # an integer past Python's digit limit
    ("\xff{", ["not valid JSON"]),
    ("[1, 2]", ["must hold a JSON object", "list"]),
])
def test_config_that_is_not_a_json_object(tmp_path, good, text, words):
    d = _copy(good, tmp_path / "c")
    (d / "config.json").write_text(text, encoding="latin-1")
    _refused(d, str(d / "config.json"), *words)


# --- config.json: the values ---------------------------------------------------------------------

def _set(section, key, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


BAD_FIELDS = [  # (section, key, value, words of the message after "<path>/config.json: ")
    ("text_config", "num_hidden_layers", 1_000_000, "text_config.num_hidden_layers must be at most 1024, got 1000000"),
    ("text_config", "hidden_size", 10**6, "text_config.hidden_size must be at most 65536, got 1000000"),
    ("text_config", "vocab_size", 10**12, "text_config.vocab_size must be at most 1000000"),
    ("vision_config", "num_hidden_layers", 10**6, "vision_config.num_hidden_layers must be at most 1024"),
    ("vision_config", "image_size", 10**5, "vision_config.image_size must be at most 16384"),
    ("text_config", "num_attention_heads", 0, "text_config.num_attention_heads must be a positive integer, got 0"),
    ("vision_config", "num_attention_heads", 0, "vision_config.num_attention_heads must be a positive integer, got 0"),
    ("vision_config", "patch_size", 0, "vision_config.patch_size must be a positive integer, got 0"),
    ("vision_config", "patch_size", 7, "vision_config.image_size (32) must be a multiple of vision_config.patch_size"),
    ("vision_config", "num_attention_heads", 5, "vision_config.hidden_size (32) must be a multiple of"),
    ("text_config", "hidden_size", "64", "text_config.hidden_size must be a positive integer, got \"64\""),
    ("text_config", "vocab_size", [128], "text_config.vocab_size must be a positive integer, got [128]"),
    ("text_config", "intermediate_size", 112.0, "text_config.intermediate_size must be a positive integer, got 112.0"),
    ("text_config", "num_hidden_layers", True, "text_config.num_hidden_layers must be a positive integer, got true"),
    ("text_config", "num_key_value_heads", -4, "text_config.num_key_value_heads must be a positive integer, got -4"),
    ("text_config", "num_key_value_heads", 3, "text_config.num_attention_heads (4) must be a multiple of "
                                              "text_config.num_key_value_heads (3)"),
    ("text_config", "head_dim", 0, "text_config.head_dim must be a positive integer, got 0"),
    ("text_config", "head_dim", 15, "text_config.head_dim must be even"),
    ("text_config", "max_position_embeddings", None, "text_config.max_position_embeddings must be a positive integer"),
    ("text_config", "rms_norm_eps", 0, "text_config.rms_norm_eps must be a positive finite number, got 0"),
    ("text_config", "rms_norm_eps", float("nan"), "text_config.rms_norm_eps must be a positive finite number, got NaN"),
    ("text_config", "rope_parameters", {"rope_theta": float("inf"), "rope_type": "default"},
     "text_config.rope_theta must be a positive finite number, got Infinity"),
    ("text_config", "rope_parameters", "x", "text_config.rope_parameters must be a JSON object, got \"x\""),
    ("text_config", "attention_bias", "false", "text_config.attention_bias must be true or false, got \"false\""),
    ("text_config", "eos_token_id", "2", "text_config.eos_token_id must be an integer, got \"2\""),
    ("vision_config", "layer_norm_eps", -1e-5, "vision_config.layer_norm_eps must be a positive finite number"),
    ("vision_config", "hidden_act", 5, "vision_config.hidden_act must be one of"),
    (None, "text_config", [1], "text_config must be a JSON object, got [1]"),
    (None, "vision_feature_layer", "x", "vision_feature_layer must be an integer, got \"x\""),
    (None, "vision_feature_layer", [], "vision_feature_layer must be an integer or a non-empty list"),
    (None, "vision_feature_layer", [-1, 99], "vision_feature_layer 99 is out of range"),
    (None, "tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got \"yes\""),
    (None, "projector_hidden_act", ["gelu"], "projector_hidden_act must be one of"),
    (None, "image_token_index", 1.5, "image_token_index must be a non-negative integer, got 1.5"),
]


@pytest.mark.parametrize("section, key, value, words", BAD_FIELDS,
                         ids=[f"{s or 'top'}.{k}={v!r}"[:60] for s, k, v, _ in BAD_FIELDS])
def test_bad_config_value_names_file_and_field(tmp_path, good, section, key, value, words):
    d = _with_config(good, tmp_path / "c", _set(section, key, value))
    msg = _refused(d, words)
    assert msg.startswith(f"{d / 'config.json'}: "), msg


@pytest.mark.parametrize("value, words", [([[32, True]], "positive integers"), ([["32", "64"]], "positive integers"),
                                          ([[32, 10**6]], "at most 16384"),
                                          ([], "non-empty list"), ("x", "non-empty list")])
def test_bad_pinpoints(tmp_path, good_next, value, words):
    d = _with_config(good_next, tmp_path / "c", _set(None, "image_grid_pinpoints", value))
    _refused(d, str(d / "config.json"), "image_grid_pinpoints", words)


# --- memory ---------------------------------------------------------------------------------------

def _llama_70b(cfg: dict) -> None:
    """A Llama-2-70B decoder: ~69e9 parameters, 276 GB in float32."""
    cfg["text_config"].update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=128, vocab_size=32000)


def _wide(cfg: dict) -> None:
    """80 layers at the width bounds: ~5.5e12 parameters, 22 TB in float32 (no machine has it free)."""
    cfg["text_config"].update(num_hidden_layers=80, hidden_size=65536, intermediate_size=262144,
                              num_attention_heads=512, num_key_value_heads=512, head_dim=None)


def _deep(cfg: dict) -> None:
    """1024 layers of width 65536: ~3e13 parameters, 123 TB in float32."""
    cfg["text_config"].update(num_hidden_layers=1024, hidden_size=65536, intermediate_size=65536, head_dim=None)


@pytest.mark.parametrize("edit, low, high", [(_llama_70b, 270, 285), (_wide, 21_000, 23_000),
                                             (_deep, 120_000, 125_000)])
def test_model_too_big_for_memory_is_refused_before_allocating(tmp_path, good, edit, low, high):
    if edit is _llama_70b and checkpoint.free_memory(torch.device("cpu")) > 300e9:
        pytest.skip("this machine has the memory for a 70B model in float32")
    d = _with_config(good, tmp_path / "c", edit)
    msg = _refused(d, f"{d / 'config.json'}: this model needs", "GB for its weights in float32", "GB free")
    need = float(msg.split("needs ")[1].split(" GB")[0].replace(",", ""))
    assert low < need < high, msg


def test_memory_check_uses_free_memory_of_the_device(good, monkeypatch):
    assert checkpoint.free_memory(torch.device("cpu")) > 0
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: 1000)
    _refused(good, "this model needs 0.0 GB", "cpu has only 0.0 GB free")


# --- weights --------------------------------------------------------------------------------------

def _with_tensor(src, dst, key, tensor):
    d = _copy(src, dst)
    state = load_file(d / "model.safetensors")
    state[key] = tensor
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.bool, "BOOL"), (torch.uint8, "U8"),
                                         (torch.float8_e4m3fn, "F8_E4M3"), (torch.complex64, "C64"),
                                         (torch.float64, "F64")])
def test_weights_must_be_floats(tmp_path, good, dtype, name):
    d = _with_tensor(good, tmp_path / "c", KEY, torch.zeros(64, 64).to(dtype))
    _refused(d, KEY, "model.safetensors", f"has dtype {name}")


def test_half_precision_weights_load(tmp_path, good):
    d = _copy(good, tmp_path / "half")
    state = load_file(d / "model.safetensors")
    state = {k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(state.items())}
    save_file(state, str(d / "model.safetensors"))
    model = fastllava.load(d, device="cpu")
    assert torch.equal(model.model.language_model.norm.weight, state["model.language_model.norm.weight"].float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_name_the_tensor(tmp_path, good, bad):
    tensor = load_file(good / "model.safetensors")[KEY].clone()
    tensor[3, 5] = bad
    _refused(_with_tensor(good, tmp_path / "c", KEY, tensor), KEY, "model.safetensors", "NaN or infinite")


def test_weights_too_large_for_float16(tmp_path, good):
    tensor = load_file(good / "model.safetensors")[KEY].clone()
    tensor[0, 0] = 1e6
    d = _with_tensor(good, tmp_path / "c", KEY, tensor)
    _refused(d, KEY, "too large for float16", dtype="float16")
    fastllava.load(d, device="cpu")  # float32 holds it


# --- the CLI --------------------------------------------------------------------------------------

def test_cli_refusals_are_fast_one_line_and_small(tmp_path, good):
    """The `fastllava run --model DIR --prompt hi` process on the bad checkpoints that used to hang,
    run for minutes or blow up memory, all at once: exit code 2, one line on stderr, no traceback,
    within LIMIT_S of CPU time and well under 2 GiB of peak memory (per process, from wait4; most of
    both is importing torch), and no hang (60 s deadline). (_refused runs the CLI's main in-process
    on every case.)"""
    fifo = _copy(good, tmp_path / "fifo")
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    zero = _copy(good, tmp_path / "zero")
    (zero / "config.json").unlink()
    (zero / "config.json").symlink_to("/dev/zero")
    cases = {
        fifo: "a FIFO",
        zero: "a device",
        _with_config(good, tmp_path / "layers", _set("text_config", "num_hidden_layers", 1_000_000)):
            "text_config.num_hidden_layers must be at most 1024",
        _with_config(good, tmp_path / "big", _wide): "GB for its weights",
    }
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU's memory is the one to check
    procs = {d: subprocess.Popen([sys.executable, "-m", "fastllava.cli", "run", "--model", str(d), "--prompt", "hi"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for d in cases}
    done = {}
    deadline = time.monotonic() + 60
    while len(done) < len(procs):
        for d, p in procs.items():
            if d not in done:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    done[d] = (os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
        if time.monotonic() > deadline:
            for d, p in procs.items():
                if d not in done:
                    p.kill()
                    p.wait()
            pytest.fail(f"no answer within 60 s for {[str(d) for d in procs if d not in done]}")
        time.sleep(0.02)
    for d, words in cases.items():
        p = procs[d]
        p.returncode = done[d][0]  # reaped by wait4
        stderr = p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        code, cpu_s, maxrss_kb = done[d]
        assert code == 2, (d, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert words in stderr and str(d) in stderr, (words, stderr)
        assert cpu_s < LIMIT_S, (d, cpu_s)
        assert maxrss_kb < 2 * GROWTH_KB, (d, maxrss_kb)
