"""The lmms-eval model plugin (fastllava.integrations.lmms_eval) called as lmms-eval calls it, with
lmms-eval's Instance when it is installed and a stand-in otherwise; and the shapes question
sets' `prompt` field, which makes every client (eval, the plugin, the server) ask the same text."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastllava
from fastllava.evaluation import evaluate, generate_dataset, load_dataset
from fastllava.evaluation.questions import prompt
from fastllava.integrations import lmms_eval as plugin
from fastllava.integrations.lmms_eval import FastLlavaLMM, to_turns
from fastllava.prompts import Turn
from serve_helpers import random_image, tiny_checkpoint

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
if HAVE_LMMS:
    from lmms_eval.api.instance import Instance
else:
    class Instance:  # the fields of lmms_eval.api.instance.Instance the model reads
        def __init__(self, request_type, arguments, idx, metadata):
            self.request_type, self.arguments, self.idx, self.metadata = request_type, arguments, idx, metadata

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

TASK, SPLIT = "shapes", "test"
QUESTIONS = ["what color is the circle ?", "describe it .", "how many red square are there ?", "what is it ?"]


def _instance(kind: str, args: tuple, i: int) -> Instance:
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("lmms")), device="cpu")


@pytest.fixture(scope="module")
def docs():
    return [{"question": q, "image": random_image(70 + i) if i != 1 else None} for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def lmm(llava, docs):
    m = FastLlavaLMM(model=llava, batch_size=2)
    m.task_dict = {TASK: {SPLIT: docs}}
    return m


def doc_to_messages(doc):
    parts = [{"type": "image", "url": doc["image"]}] if doc["image"] is not None else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": doc["question"]}]}]


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def test_generate_until_equals_generate_in_batches_with_stop_strings(lmm, llava, docs):
    gen = {"max_new_tokens": 10, "temperature": 0, "do_sample": False, "until": []}
    refs = [llava.generate(images=[d["image"]], prompts=[d["question"]], max_new_tokens=10)[0] for d in docs]
    reqs = [_instance("generate_until", ("", doc_to_messages, dict(gen), i, TASK, SPLIT), i) for i in range(len(docs))]
    assert lmm.generate_until(reqs) == [r.text for r in refs]
    # `until`: generation stops before the first stop string, as generate(stop=...)
    words = refs[0].text.split()
    assert len(words) >= 3
    req = _instance("generate_until", ("", doc_to_messages, {**gen, "until": [words[2]]}, 0, TASK, SPLIT), 0)
    stopped = llava.generate(images=[docs[0]["image"]], prompts=[docs[0]["question"]], max_new_tokens=10,
                             stop=[words[2]])[0]
    assert lmm.generate_until([req]) == [stopped.text] and words[2] not in stopped.text
    # the simple shape (context, gen_kwargs, doc_to_visual, ...) asks the same
    simple = [_instance("generate_until", (d["question"], dict(gen), doc_to_visual, i, TASK, SPLIT), i)
              for i, d in enumerate(docs)]
    assert lmm.generate_until(simple) == [r.text for r in refs]


def _reference(llava, turns, images, n):
    ids = llava.prompts.chat_ids(turns)
    pixels = llava.processor(images) if images else None
    out = llava.generate_ids(torch.tensor([ids]), pixels, max_new_tokens=n)[0].tolist()
    eos = llava.config.text.eos_token_id
    return llava.prompts.decode(out[:out.index(eos)] if eos in out else out)


def test_several_images_and_turns(lmm, llava):
    a, b = random_image(80), random_image(81)
    messages = [{"role": "system", "content": [{"type": "text", "text": "describe"}]},
                {"role": "user", "content": [{"type": "image", "url": a}, {"type": "text", "text": "what is it ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a circle ."}]},
                {"role": "user", "content": [{"type": "image", "url": b}, {"type": "text", "text": "and this ?"}]}]
    req = _instance("generate_until", ("", lambda doc: messages, {"max_new_tokens": 8}, 0, TASK, SPLIT), 0)
    turns = [Turn("user", "describe\nwhat is it ?", 1), Turn("assistant", "a circle ."), Turn("user", "and this ?", 1)]
    assert to_turns(messages) == (turns, [a, b])
    assert lmm.generate_until([req]) == [_reference(llava, turns, [a, b], 8)]


def test_multi_round(lmm, llava, docs):
    def rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            return doc_to_messages(doc)
        if round_idx == 1:
            return [{"role": "user", "content": [{"type": "text", "text": "how many are there ?"}]}], False, \
                previous_output, {"round": 1}
        return None, True, previous_output, previous_round_info

    req = _instance("generate_until_multi_round", ("", rounds, {"max_new_tokens": 6}, 0, TASK, SPLIT), 0)
    [outputs] = lmm.generate_until_multi_round([req])
    first = llava.generate(images=[docs[0]["image"]], prompts=[docs[0]["question"]], max_new_tokens=6)[0].text
    second = _reference(llava, [Turn("user", docs[0]["question"], 1), Turn("assistant", first),
                                Turn("user", "how many are there ?")], [docs[0]["image"]], 6)
    assert outputs == [first, second]


def test_loglikelihood(lmm, llava, docs):
    doc = docs[0]
    greedy = llava.generate(images=[doc["image"]], prompts=[doc["question"]], max_new_tokens=4)[0]
    ids = llava.prompts.prompt_ids(doc["question"], 1) + greedy.token_ids
    logits = llava.logits(torch.tensor([ids]), llava.processor([doc["image"]]))[0]
    t = len(ids) - len(greedy.token_ids)
    expected = float(logits[t - 1:-1].log_softmax(-1).gather(-1, torch.tensor(greedy.token_ids)[:, None]).sum())
    other = "red blue green"
    reqs = [_instance("loglikelihood", (doc["question"], " " + greedy.text, doc_to_visual, 0, TASK, SPLIT), 0),
            _instance("loglikelihood", (doc["question"], lambda d: other, doc_to_visual, 0, TASK, SPLIT), 0),
            _instance("loglikelihood", (docs[1]["question"], "", doc_to_visual, 1, TASK, SPLIT), 1)]
    (lp, is_greedy), (lp_other, other_greedy), empty = lmm.loglikelihood(reqs)
    assert lp == pytest.approx(expected, abs=1e-4) and is_greedy
    assert lp_other < 0 and not other_greedy and empty == (0.0, True)


def test_model_args_and_registration(llava):
    m = FastLlavaLMM(pretrained=str(llava.path), device="cpu", batch_size="3", reduce="none", max_batch_size=None)
    assert m.batch_size == 3 and m.reduce is None and m.rank == 0 and m.world_size == 1
    with pytest.raises(fastllava.UserError, match="batch_size"):
        FastLlavaLMM(model=llava, batch_size=0)
    with pytest.raises(fastllava.UserError):
        FastLlavaLMM(model=llava, reduce="nosuch:keep=1")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"] == {
        "fastllava": "fastllava.integrations.lmms_eval:manifest"}
    assert project["project"]["optional-dependencies"]["lmms"] == ["lmms-eval>=0.7", "filelock<4"]
    if HAVE_LMMS:
        from lmms_eval.api.model import lmms

        assert issubclass(plugin.FastLlava, lmms) and plugin.FastLlava.is_simple is False
        assert plugin.manifest().chat_class_path == "fastllava.integrations.lmms_eval.FastLlava"
    else:
        with pytest.raises(fastllava.UserError, match=r"pip install 'fastllava\[lmms\]'"):
            plugin.FastLlava


def test_question_sets_carry_the_prompt_eval_asks(tmp_path):
    generate_dataset(6, 3, tmp_path, image_size=32, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert all(row["prompt"] == prompt(row["question"]) for row in lines)
    assert [s.asked for s in load_dataset(tmp_path).samples] == [row["prompt"] for row in lines]

    asked = []

    class Model:  # records what eval asks
        def generate(self, images, prompts, **kw):
            asked.extend(prompts)
            stats = {"image_tokens": 16, "visual_tokens": [16], "visual_tokens_equivalent": 16.0}
            return [SimpleNamespace(text="red", finish_reason="stop", stats=stats) for _ in prompts]

    lines[0]["prompt"] = "What is it? Answer in one word."  # a set's own prompt is asked as it is
    for row in lines[1:3]:
        del row["prompt"]  # sets written before the field: the question and the suffix
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    evaluate(Model(), tmp_path, progress=False)
    assert asked == [lines[0]["prompt"]] + [prompt(r["question"]) for r in lines[1:3]] + [r["prompt"] for r in lines[3:]]
    lines[0]["prompt"] = 7
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert load_dataset(tmp_path).errors == ["questions.jsonl:1: field 'prompt' must be a string, got int"]
