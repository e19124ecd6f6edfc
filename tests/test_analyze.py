"""`fastllava analyze`: the text-dominance indices (MDI, AEI) by hand, then end to end on a tiny random LLaVA."""

import json
import math

import pytest
import torch

import fastllava
from fastllava import cli
from fastllava.errors import UserError
from fastllava.evaluation import generate_dataset
from fastllava.evaluation.analysis import analyze, indices
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words, write_preprocessor_config
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

T = torch.tensor([True, True, False, False, False, False])  # 2 text tokens
V = ~T  # 4 visual tokens


def test_indices_by_hand():
    # text 0.3 + 0.3 = 0.6 over 2 tokens (0.3 each), visual 4 x 0.1 = 0.4 (0.1 each): MDI 3;
    # text's share of the attention 0.6 over its share of the tokens 2/6: AEI 1.8
    mdi, aei = indices(torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1]), T, V)
    assert mdi == pytest.approx(3.0) and aei == pytest.approx(1.8)
    # uniform attention is balanced
    assert indices(torch.full((6,), 1 / 6), T, V) == (pytest.approx(1.0), pytest.approx(1.0))
    # two heads are averaged first: (0.5, 0.1, ...) and (0.1, 0.1, 0.2, ...) -> (0.3, 0.1, 0.15, 0.15, 0.15, 0.15)
    heads = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    mdi, aei = indices(heads, T, V)
    assert mdi == pytest.approx((0.4 / 2) / (0.6 / 4)) and aei == pytest.approx(0.4 / (2 / 6))
    # keys of neither modality (padding) count for neither: MDI unchanged, AEI over the two only
    mdi, aei = indices(torch.tensor([0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2]), torch.cat([T, torch.tensor([False])]),
                       torch.cat([V, torch.tensor([False])]))
    assert mdi == pytest.approx(2.0) and aei == pytest.approx((0.4 / 0.8) / (2 / 6))
    # no attention on the image at all stays finite (the visual mass is clamped)
    mdi, aei = indices(torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0]), T, V)
    assert math.isfinite(mdi) and mdi > 1e20 and aei == pytest.approx(3.0)
    with pytest.raises(ValueError, match="both text and visual"):
        indices(torch.full((6,), 1 / 6), T, torch.zeros(6, dtype=torch.bool))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
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
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    generate_dataset(12, 7, path, image_size=48, progress=False)
    return path


def _main(argv) -> int:
    """cli.main (which registers `analyze`)."""
    return cli.main(argv)


def _finite(values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_command_writes_finite_indices_for_every_family_and_layer(checkpoint, dataset, tmp_path, capsys):
    out = tmp_path / "a"
    assert _main(["analyze", "--model", str(checkpoint), "--data", str(dataset), "--out", str(out), "--device", "cpu",
                  "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("MDI ") and "on 12 questions" in printed
    r = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["overall"]["n"] == 12 and r["overall"]["visual_tokens"] == 16
    assert _finite([r["overall"]["mdi"], r["overall"]["aei"]])
    assert len(r["layers"]["mdi"]) == len(r["layers"]["aei"]) == 3  # tiny_llava's decoder layers
    assert _finite(r["layers"]["mdi"] + r["layers"]["aei"])
    families = {json.loads(line)["family"] for line in (dataset / "questions.jsonl").read_text().splitlines()}
    assert set(r["families"]) == families
    assert sum(f["n"] for f in r["families"].values()) == 12
    assert all(_finite([f["mdi"], f["aei"]]) for f in r["families"].values())
    assert r["overall"]["mdi"] == pytest.approx(sum(r["layers"]["mdi"]) / 3)
    assert r["settings"]["reduce"] is None and r["settings"]["paper"] == "arXiv:2508.10552"


def test_reduction_before_the_llm_changes_mdi(checkpoint, dataset):
    model = fastllava.load(checkpoint, device="cpu", dtype="float32")
    plain = analyze(model, dataset, limit=4, progress=False)
    reduced = analyze(model, dataset, reduce="fastervlm:keep=4", limit=4, progress=False)
    assert reduced["overall"]["visual_tokens"] == 4 and plain["overall"]["visual_tokens"] == 16
    assert reduced["overall"]["text_tokens"] == plain["overall"]["text_tokens"]
    assert _finite(reduced["layers"]["mdi"] + reduced["layers"]["aei"])
    assert abs(reduced["overall"]["mdi"] - plain["overall"]["mdi"]) > 1e-3
    assert reduced["settings"]["reduce"] == "fastervlm:keep=4"
    for spec in ("fastv:keep=4,layer=1", "visiondrop:keep=4,llm=1"):  # the second acts before the LLM and in it
        with pytest.raises(UserError, match="cuts inside the LLM"):
            analyze(model, dataset, reduce=spec, limit=1, progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit"),
    (["--reduce", "fastv:keep=4"], "cuts inside the LLM"),
    (["--reduce", "nosuch"], "unknown reduction method"),
    (["--reduce", "fastervlm:keep=99"], "99"),
    (["--data", "NOWHERE"], "does not exist"),
])
def test_bad_arguments_are_one_line_errors(checkpoint, dataset, tmp_path, capsys, extra, message):
    argv = ["analyze", "--model", str(checkpoint), "--data", str(dataset), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--quiet"]
    if extra[0] == "--data":
        argv[4] = str(tmp_path / extra[1])
    else:
        argv += extra
    try:
        code = _main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_out_is_an_argument_error(dataset, capsys):
    with pytest.raises(SystemExit) as e:
        _main(["analyze", "--data", str(dataset)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
