"""`fastllava eval` and the reduction sweep on a tiny random LLaVA-NeXT (32-pixel tiles of 4 x 4
patches) over the hires shapes variant, whose canvases (64x64, 96x32, 32x96, 64x32, 32x64 at
32-pixel tiles) are the model's pinpoints: visual token counts are those of each image, and a
budget above the smallest image's count fails before anything runs."""

import json

import pytest
from PIL import Image

import fastllava
from fastllava.cli import main
from fastllava.evaluation import generate_dataset, load_dataset
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words
from hf_reference import IMAGE_TOKEN, PINPOINTS, VOCAB, save_checkpoint, tiny_llava
from test_llava_next import PROCESSOR

LAYERS = 3  # decoder layers of the tiny model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_checkpoint(tiny_llava(pinpoints=PINPOINTS, seed=11, kv_heads=2), tmp_path_factory.mktemp("next"), "new")
    build_word_tokenizer(default_words(), IMAGE_TOKEN, VOCAB).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("hires")
    generate_dataset(12, 2, path, image_size=32, variant="hires", progress=False)
    return path


@pytest.fixture(scope="module")
def tokens(checkpoint, data) -> list[int]:
    """Unreduced visual tokens of each question's image, from its size alone."""
    cfg = fastllava.load(checkpoint, device="cpu").config
    return [cfg.image_tokens(*Image.open(s.image).size[::-1]) for s in load_dataset(data).samples]


def test_images_give_different_counts(tokens):
    assert len(set(tokens)) >= 3 and min(tokens) == 52  # a 32 x 64 canvas: 16 + 4 rows of 8 + newline


def _eval(checkpoint, data, out, *extra) -> int:
    return main(["eval", "--model", str(checkpoint), "--device", "cpu", "--data", str(data), "--batch-size", "5",
                 "--max-new-tokens", "2", "--out", str(out), "--quiet", *extra])


def test_eval_records_each_images_visual_tokens(checkpoint, data, tokens, tmp_path):
    assert _eval(checkpoint, data, tmp_path / "r", "--reduce", "fastv:keep=20,layer=1") == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert [s["image_tokens"] for s in samples] == tokens
    assert [s["visual_tokens"] for s in samples] == [[t, 20] for t in tokens]  # entering, from layer 1 on
    mean = sum(tokens) / len(tokens)
    assert results["visual_tokens"] == {"unreduced": round(mean, 2), "min": min(tokens), "max": max(tokens),
                                        "equivalent": pytest.approx((mean + 2 * 20) / LAYERS, abs=0.01)}
    assert results["settings"]["dataset"]["variant"] == "hires" and results["settings"]["generate"]["reduce"]


def test_sweep_counts_visual_tokens_per_image(checkpoint, data, tokens, tmp_path):
    out = tmp_path / "sweep"
    assert _eval(checkpoint, data, out, "--reduce", "fastv:layer=1,hired,globalcom2", "--keep", "40,12") == 0
    result = json.loads((out / "sweep.json").read_text())
    mean = sum(tokens) / len(tokens)
    assert result["variant"] == "hires" and result["n"] == len(tokens)
    assert result["visual_tokens"] == result["baseline"]["keep"] == round(mean, 2)
    assert result["baseline"]["visual_tokens_equivalent"] == round(mean, 2)
    assert len(result["runs"]) == 6
    for r in result["runs"]:
        # fastv: every image's tokens in layer 0, keep from layer 1 on; the others: keep in all layers
        want = (mean + 2 * r["keep"]) / LAYERS if r["method"] == "fastv" else r["keep"]
        assert r["visual_tokens_equivalent"] == pytest.approx(want, abs=0.01), r
        assert r["n"] == len(tokens)  # no question lost to a budget
    assert f"unreduced ({round(mean, 2):g} visual tokens per question)" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("extra", [["--reduce", "hired:keep=53"], ["--reduce", "fastervlm,hired", "--keep", "40,60"]])
def test_budget_above_an_images_tokens_fails_before_running(checkpoint, data, tokens, tmp_path, capsys, extra):
    assert _eval(checkpoint, data, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err
    line = 1 + tokens.index(52)
    assert len(err.strip().splitlines()) == 1
    assert f"visual tokens of {load_dataset(data).samples[line - 1].image.name} (questions.jsonl:{line})" in err
    assert "budget 53 is more than the 52" in err or "budget 60 is more than the 52" in err
    assert not (tmp_path / "o").exists()
