"""Chat features lmms-eval's `--model openai` and other OpenAI clients rely on, through the official
openai client: multi-turn conversations (images in any user turn) equal model.generate_ids on the
rendered prompt, top_p 0 is greedy, max_tokens clamped to the context, served-name aliases, and
the start-up line of `fastllava serve`."""

from __future__ import annotations

import json

import pytest
import torch
from openai import NotFoundError, OpenAI

import fastllava
from fastllava.prompts import Conversation, Turn
from fastllava.serve.errors import APIError
from fastllava.serve.protocol import parse_chat
from fastllava.serve.settings import Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint

# transformers' chat template of llava-hf/llava-1.5-7b-hf
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
ALIASES = ("llava-1.5-7b-hf", "gpt-4o-mini")
CONTEXT = 96


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("chat")), device="cpu")


@pytest.fixture(scope="module")
def base(llava):
    with running_server(llava, Settings(model_id="tiny", aliases=ALIASES, max_batch_size=4, max_len=CONTEXT)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _image_part(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(random_image(seed)))}}


def _reference(llava, turns: list[Turn], seeds: list[int], n: int) -> tuple[str, int]:
    """(text, prompt tokens) of greedy generate_ids on the turns' ids, the images in order."""
    ids = llava.prompts.chat_ids(turns)
    pixels = llava.processor([random_image(s) for s in seeds]) if seeds else None
    out = llava.generate_ids(torch.tensor([ids]), pixels, max_new_tokens=n)[0].tolist()
    eos = llava.config.text.eos_token_id
    return llava.prompts.decode([t for t in out if t != eos]), len(ids)


def test_llava_format_matches_transformers_template(llava, tmp_path):
    """Without a chat template the conversation renders as llava-1.5-hf's template renders it."""
    turns = [Turn("user", "what color is the circle ?", 1), Turn("assistant", "red ."),
             Turn("user", "and the square ?", 2)]
    plain = llava.prompts.format_turns(turns)
    assert plain == "USER: <image>\nwhat color is the circle ? ASSISTANT: red . USER: <image>\n<image>\nand the " \
                    "square ? ASSISTANT:"
    for f in llava.path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE)
    templated = fastllava.load(tmp_path, device="cpu").prompts
    assert templated.format_turns(turns) == plain
    assert templated.format("what is it ?", 1) == llava.prompts.format("what is it ?", 1)
    # one turn: the single-turn path is the conversation path
    assert llava.prompts.prompt_ids("what is it ?", 1) == llava.prompts.chat_ids([Turn("user", "what is it ?", 1)])
    ids = llava.prompts.chat_ids(turns, [3, 4, 5])  # each image's own count, in order
    assert ids.count(llava.config.image_token_index) == 12
    conv = Conversation(turns)  # a str (length checks) that prompt_ids renders as its turns
    assert isinstance(conv, str) and llava.prompts.prompt_ids(conv, 3) == llava.prompts.chat_ids(turns)


def test_multi_turn_with_images_equals_generate(client, llava):
    messages = [{"role": "system", "content": "describe"},
                {"role": "user", "content": [_image_part(1), {"type": "text", "text": "what color is the circle ?"}]},
                {"role": "assistant", "content": "red ."},
                {"role": "user", "content": "how many are there ?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    turns = [Turn("user", "describe\nwhat color is the circle ?", 1), Turn("assistant", "red ."),
             Turn("user", "how many are there ?")]
    text, prompt_tokens = _reference(llava, turns, [1], 12)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.prompt_tokens_details.image_tokens == 16

    # images in two user turns (the second after an assistant answer given as text parts), streamed
    messages = [{"role": "user", "content": [_image_part(2), {"type": "text", "text": "what is it ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a circle ."}]},
                {"role": "user", "content": [{"type": "text", "text": "and this ?"}, _image_part(3)]}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    text, _ = _reference(llava, [Turn("user", "what is it ?", 1), Turn("assistant", "a circle ."),
                                 Turn("user", "and this ?", 1)], [2, 3], 10)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_conversation_shapes():
    def turns(messages):
        return parse_chat({"messages": messages}, 4).prompt.turns

    u, a = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    assert turns([u, u, a, u]) == (Turn("user", "x\nx"), Turn("assistant", "y"), Turn("user", "x"))  # merged
    for messages, code in [([a, u], "invalid_value"), ([u, a], "unsupported_value"),
                           ([u, {"role": "tool", "content": "z"}, u], "unsupported_value"),
                           ([u, {"role": "assistant", "content": [_image_part(0)]}, u], "unsupported_value"),
                           ([u, {"role": "assistant", "content": None, "tool_calls": [{}]}, u], "unsupported_value")]:
        with pytest.raises(APIError) as e:
            parse_chat({"messages": messages}, 4)
        assert e.value.status == 400 and e.value.code == code, e.value.message


def test_top_p_zero_is_greedy(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": [_image_part(4), {"type": "text", "text": "describe it ."}]}],
              max_tokens=8)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    for seed in (1, 2):
        assert client.chat.completions.create(temperature=1.0, top_p=0, seed=seed, **kw).choices[0].message.content == greedy


def test_max_tokens_is_clamped_to_the_context(client, base, llava):
    """A max_tokens past the context is cut to what fits (finish_reason "length" when that ends
    the answer); only a prompt that does not fit itself is refused."""
    messages = [{"role": "user", "content": [_image_part(5), {"type": "text", "text": "describe it ."}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=500, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT
    status, body = raw_request(base, "POST", "/v1/chat/completions",
                               {"model": "tiny", "messages": [{"role": "user", "content": "what " * 200}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_served_name_aliases(client, base):
    assert [m.id for m in client.models.list()] == ["tiny", *ALIASES]
    for name in ("tiny", *ALIASES):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "what is it ?"}],
                                           max_tokens=2)
        assert r.model == "tiny"
        assert client.models.retrieve(name).id in ("tiny", *ALIASES)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_serve_names_and_start_up_line(llava, monkeypatch, capsys):
    import uvicorn

    from fastllava.cli import build_parser

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    args = build_parser().parse_args(["serve", "--model", str(llava.path), "--device", "cpu", "--port", "18731",
                                      "--served-model-name", "llava", "llava-1.5,gpt-4o", "--served-model-name",
                                      "llava"])
    assert args.func(args) == 0 and ran["port"] == 18731
    out = capsys.readouterr().out
    assert "serving llava (also as llava-1.5, gpt-4o) on http://127.0.0.1:18731" in out
    args = build_parser().parse_args(["serve", "--model", str(llava.path), "--served-model-name", "a,,b"])
    with pytest.raises(fastllava.UserError, match="empty name"):
        args.func(args)
    assert json.loads(json.dumps(Settings(model_id="x", aliases=("y", "x", "y")).served_names)) == ["x", "y"]
