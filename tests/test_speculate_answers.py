"""benchmarks/speculate_answers.py: each spec against plain greedy on a question set's answers."""

import json
import subprocess
import sys
from pathlib import Path

from fastllava.evaluation import generate_dataset

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "speculate_answers.py"


def test_speculation_report_on_long_answers(tmp_path):
    generate_dataset(3, 31, tmp_path / "describe", families=["describe"], progress=False)
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "describe"), "--limit", "3",
                        "--max-new-tokens", "24", "--speculate", "ngram", "--speculate", "layerskip:k=3",
                        "--draft-layers", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "speculate.json").read_text())
    decodes = report["decodes"]
    draft = f"draft:model={tmp_path / 'out' / 'draft-2'}"  # the target's first 2 of 4 layers
    assert list(decodes) == ["plain", "ngram", "layerskip:k=3", draft] and report["settings"]["questions"] == 3
    assert json.loads((tmp_path / "out" / "draft-2" / "config.json").read_text())["text_config"][
        "num_hidden_layers"] == 2
    plain = decodes["plain"]
    assert plain["tokens"] > 3 and plain["draft"] == 0  # answers of several tokens, nothing drafted
    assert decodes[draft]["draft"] > 0
    for name in ("ngram", "layerskip:k=3", draft):
        d = decodes[name]
        assert d["same"] is True and d["tokens"] == plain["tokens"]  # lossless: the same answers
        assert 0 <= d["kept"] <= d["draft"] and d["steps"] >= 1
    assert decodes["layerskip:k=3"]["draft"] > 0
    assert "| `ngram` |" in (tmp_path / "out" / "speculate.md").read_text()


def test_speculation_report_refuses_bad_input(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    generate_dataset(1, 31, tmp_path / "d", families=["describe"], progress=False)
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "d"), "--draft-layers", "4",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--draft-layers must be in 1..3" in r.stderr
