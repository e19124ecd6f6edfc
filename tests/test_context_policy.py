"""One context policy everywhere: a prompt plus max_new_tokens over the model's context
(max_position_embeddings) is refused with one line, before anything is allocated, by generate,
generate_ids, `run` and `eval` as by the server."""

from __future__ import annotations

import time

import pytest

import fastllava
from fastllava.cli import main
from fastllava.serve.settings import Settings
from serve_helpers import data_url, raw_request, running_server, user_message


def test_generate_refuses_what_does_not_fit_the_context():
    model = fastllava.load()
    ctx = model.config.text.max_position_embeddings
    inputs = model.inputs(["examples/shapes_1.png"], ["What color is the circle?"])
    t = int(inputs["attention_mask"].sum())
    with pytest.raises(fastllava.UserError, match=f"over the model's context of {ctx} tokens; ask for at most {ctx - t}"):
        model.generate(images=["examples/shapes_1.png"], prompts=["What color is the circle?"],
                       max_new_tokens=ctx - t + 1)
    with pytest.raises(fastllava.UserError, match="over the model's context"):
        model.generate_ids(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                           max_new_tokens=ctx - t + 1)
    out = model.generate(images=["examples/shapes_1.png"], prompts=["What color is the circle?"],
                         max_new_tokens=ctx - t)  # exactly what fits
    assert out[0].finish_reason in ("stop", "length")


def test_cli_run_refuses_a_huge_max_new_tokens_at_once(capsys):
    t0 = time.perf_counter()
    code = main(["run", "--image", "examples/shapes_2.png", "--prompt", "What shape?", "--max-new-tokens", "10000000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "over the model's context of 1024 tokens" in err
    assert time.perf_counter() - t0 < 30  # no allocation for ten million tokens


def test_cli_eval_refuses_prompts_over_the_context(tmp_path, capsys):
    assert main(["data", "shapes", "--n", "4", "--seed", "5", "--out", str(tmp_path / "d")]) == 0
    code = main(["eval", "--data", str(tmp_path / "d"), "--max-new-tokens", "1000", "--out", str(tmp_path / "r")])
    assert code == 2 and "over the model's context" in capsys.readouterr().err


def test_the_embedded_next_model_answers_its_example_through_the_server():
    """Its example image gives a ~2940-token prompt: within its 4096-token context."""
    model = fastllava.load("default-next")
    prompt = "How many triangles are there? Answer with one word."
    ref = model.generate(images=["examples/hires_1.png"], prompts=[prompt], max_new_tokens=4)[0]
    with open("examples/hires_1.png", "rb") as f:
        url = data_url(f.read())
    with running_server(model, Settings(model_id="next")) as base:
        status, body = raw_request(base, "POST", "/v1/chat/completions",
                                   {"model": "next", "messages": user_message(prompt, url), "max_tokens": 4,
                                    "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == ref.text
    assert body["usage"]["prompt_tokens"] > 2048
