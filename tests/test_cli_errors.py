"""Command-line mistakes that used to end in a traceback: each is one line on stderr and exit code
2, and, where the mistake is in the options themselves, before any weights load (the cases give a
--model that does not exist: the error is about the option, not the model)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from fastllava.cli import main
from serve_helpers import tiny_checkpoint

NO_MODEL = "/nonexistent/fastllava-model"  # loading it would fail with "does not exist"


def _one_line_error(capsys, args: list[str]) -> str:
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "does not exist" not in err, err  # refused before loading the model
    return err


@pytest.mark.parametrize("args, words", [
    (["--top-p", "nan"], ["top_p"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--temperature", "inf"], ["temperature"]),
    (["--temperature", "1e400"], ["temperature"]),
    (["--top-k", "-1"], ["top_k"]),
    (["--seed", "1e20"], ["--seed", "invalid int"]),
    (["--seed", str(10**20)], ["seed", "64 bits"]),
    (["--prompt", os.fsdecode(b"caf\xe9 ?")], ["--prompt", "not valid UTF-8"]),
    (["--stop", os.fsdecode(b"\xff")], ["--stop", "not valid UTF-8"]),
    (["--device", "meta"], ["--device", "cpu, cuda or cuda:N"]),
    (["--device", "cuda:x"], ["--device"]),
    (["--reduce", f"random:keep=8,seed={2**70}"], ["seed=", "[-2**63, 2**63)"]),
    (["--reduce", "fastv:keep=8,keep=9"], ["'keep' is given twice"]),
    (["--reduce", "globalcom2:tau=nan"], ["tau=", "finite"]),
])
def test_run_option_errors(capsys, args, words):
    err = _one_line_error(capsys, ["run", "--model", NO_MODEL, "--prompt", "hi", *args])
    for w in words:
        assert w in err, err


def test_serve_refuses_an_address_it_cannot_listen_on(capsys):
    err = _one_line_error(capsys, ["serve", "--model", NO_MODEL, "--host", "999.1.1.1"])
    assert "cannot listen on --host 999.1.1.1" in err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        err = _one_line_error(capsys, ["serve", "--model", NO_MODEL, "--port", port])
    assert f"--port {port}" in err and "in use" in err
    err = _one_line_error(capsys, ["serve", "--model", NO_MODEL, "--api-key", os.fsdecode(b"k\xff")])
    assert "--api-key" in err and "not valid UTF-8" in err


def test_argv_bytes_that_are_not_utf8():
    """The real thing: a prompt given as bytes in argv (Python decodes them with surrogateescape)."""
    r = subprocess.run([sys.executable, "-m", "fastllava.cli", "run", "--model", NO_MODEL, "--prompt",
                        b"caf\xe9 ?"], capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "not valid UTF-8" in err and "caf\\xe9" in err, err


def test_sparsevlm_recycle_rule_is_the_message(tmp_path, capsys):
    """recycle is in 0..keep-1 or -1 (keep // 8); -5 used to pass as -1. The check needs the model."""
    model = str(tiny_checkpoint(tmp_path / "m"))
    err = _one_line_error(capsys, ["run", "--model", model, "--device", "cpu", "--prompt", "what is it ?",
                                   "--reduce", "sparsevlm:keep=8,recycle=-5"])
    assert "recycle must be in 0..keep-1 (7), or -1 for keep // 8" in err, err


def test_a_top_p_that_float32_rounds_to_zero_runs(tmp_path, capsys):
    """--top-p 1e-300 keeps the most likely token (it used to sample from NaN probabilities)."""
    model = str(tiny_checkpoint(tmp_path / "m"))
    args = ["run", "--model", model, "--device", "cpu", "--prompt", "what is it ?", "--max-new-tokens", "3", "--json"]
    assert main(args + ["--temperature", "1", "--top-p", "1e-300"]) == 0
    sampled = json.loads(capsys.readouterr().out)["text"]
    assert main(args) == 0
    assert sampled == json.loads(capsys.readouterr().out)["text"]
