"""`fastllava methods`, `eval --reduce ... --keep ...` (the sweep) and `inspect` on a tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from fastllava.cli import main
from fastllava.evaluation.dataset import generate_dataset
from fastllava.reduction import METHODS
from test_reduction import model  # noqa: F401  (the tiny checkpoint fixture)


@pytest.fixture(scope="module")
def ckpt(model):  # noqa: F811
    return str(model.path)


def test_methods_lists_every_method_with_paper(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in METHODS.items():
        assert name in out and cls.paper in out
    assert "keep=64" in out


def test_sweep_writes_table_json_and_plot(ckpt, tmp_path, capsys):
    data = tmp_path / "data"
    generate_dataset(6, 3, data, image_size=32, progress=False)
    out = tmp_path / "sweep"
    code = main(["eval", "--model", ckpt, "--device", "cpu", "--data", str(data), "--reduce", "fastv:layer=1,pool",
                 "--keep", "8,4", "--batch-size", "4", "--max-new-tokens", "2", "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["label"], r["keep"]) for r in result["runs"]] == [
        ("fastv:layer=1", 8), ("fastv:layer=1", 4), ("pool", 8), ("pool", 4)]
    assert result["baseline"]["keep"] == 16 and result["n"] == 6
    for r in result["runs"]:
        base = result["baseline"]["accuracy"]
        assert r["retained"] == (round(100 * r["accuracy"] / base, 2) if base else None)
    assert result["runs"][0]["visual_tokens_equivalent"] == round((16 + 8 + 8) / 3, 2)
    for r in [result["baseline"], *result["runs"]]:  # prefill cost of the same 6 questions, per run
        assert r["timed_questions"] == 6 and r["prefill_ms"] > 0
    pool = {r["keep"]: r for r in result["runs"] if r["label"] == "pool"}
    assert result["baseline"]["prefill_gflops"] > pool[8]["prefill_gflops"] > pool[4]["prefill_gflops"]
    table = (out / "sweep.md").read_text()
    assert "| method | keep 8 | keep 4 |" in table and "| pool |" in table and " ms |" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pool |" in capsys.readouterr().out


def test_sweep_rejects_budget_above_available(ckpt, tmp_path, capsys):
    data = tmp_path / "data"
    generate_dataset(3, 3, data, image_size=32, progress=False)
    code = main(["eval", "--model", ckpt, "--device", "cpu", "--data", str(data), "--reduce", "fastv",
                 "--keep", "32", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "budget 32 is outside 1..16" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("spec, kept, merged", [("visionzip:keep=6,contextual=2", 6, 10), ("fastv:keep=5,layer=1", 5, 0)])
def test_inspect_draws_kept_patches(ckpt, tmp_path, capsys, spec, kept, merged):
    img = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "overlay.png"
    assert main(["inspect", "--model", ckpt, "--device", "cpu", "--image", str(img), "--prompt", "what color ?",
                 "--reduce", spec, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == kept and summary["merged"] == merged
    assert summary["kept"] + summary["merged"] + summary["dropped"] == 16
    picture = np.asarray(Image.open(out).convert("L"))
    assert picture.shape == (448 + 56, 448)  # the 448-pixel image under a band: title, counts, legend
    band = picture[:56]
    assert (band < 128).any(axis=1)[4:14].any() and (band < 128).any(axis=1)[20:30].any()  # two lines of text


def test_sweep_on_describe_reports_object_f1(tmp_path):
    """A describe set: every row carries its object F1 (the mean of its questions'), shown in the
    table; the embedded model lists objects well unreduced and badly from 8 random tokens."""
    data = tmp_path / "describe"
    generate_dataset(6, 4345, data, families=["describe"], progress=False)
    out = tmp_path / "sweep"
    assert main(["eval", "--device", "cpu", "--data", str(data), "--reduce", "random", "--keep", "8",
                 "--batch-size", "6", "--max-new-tokens", "96", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    base, run = result["baseline"], result["runs"][0]
    for row, name in ((base, "none"), (run, run["spec"].replace(":", "_"))):
        samples = [json.loads(line) for line in (out / "runs" / name / "samples.jsonl").read_text().splitlines()]
        assert row["object_f1"]["describe"] == round(sum(s["object_f1"] for s in samples) / len(samples), 4)
    assert base["object_f1"]["describe"] >= 0.8 and run["object_f1"]["describe"] < base["object_f1"]["describe"] - 0.2
    table = (out / "sweep.md").read_text()
    assert f"describe F1 {base['object_f1']['describe']:.3f} on 6 questions" in table
    assert f"describe F1 {run['object_f1']['describe']:.3f}" in table.split("| random |")[1]
