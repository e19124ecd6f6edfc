"""Fuzzing the chat-completion request schema: hypothesis writes bodies that mix valid and invalid
fields (message shapes, content parts, numbers such as NaN, 1e400 and 5000-digit integers written
as raw JSON text, strings with lone surrogates, NULs and other odd Unicode, unknown fields, broken
JSON). Every answer is below 500, every 4xx is an OpenAI error object, and afterwards the server
answers a fixed request exactly as it did before."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastllava
from fastllava.serve.settings import Limits, Settings
from serve_helpers import data_url, png_bytes, random_image, raw_request, running_server, tiny_checkpoint, user_message

IMAGE = data_url(png_bytes(random_image(0, (32, 32))))
GOOD = {"model": "tiny", "messages": user_message("what color is the circle ?", IMAGE), "max_tokens": 4,
        "temperature": 0}


class Raw(str):
    """JSON text put into the body as it is (numbers json.dumps cannot write)."""


def dump(value) -> str:
    """JSON text of value, Raw leaves as they are, lone surrogates escaped."""
    if isinstance(value, Raw):
        return value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as JavaScript writes them; non-ASCII as \u escapes


RAW_NUMBERS = [Raw(t) for t in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "1e-300",
                                "1" + "0" * 30, "9" * 5000, "0.5", "2", "-1")]
ODD = ["\ud800", "x\udfffy", "\x00", "\u202e", "\U0001F600", "a\r\nb", "\ufeff", "w" * 300, "", " ", "<image>",
       "USER:", "random:keep=4,seed=-1"]


def mostly(good, bad):
    """good seven times in eight, else bad: a third of the requests get past every check."""
    # not one_of, which would weigh each of their branches alike; bad at a middle value, as hypothesis
    # favours the ends of a range
    return st.integers(0, 7).flatmap(lambda i: bad if i == 3 else good)


odd_strings = st.one_of(st.sampled_from(ODD), st.text(max_size=12),
                        st.text(st.characters(categories=["Cs", "Cc", "Zs", "So"]), max_size=4))
words = st.sampled_from(["what color is the circle ?", "how many are there ?", "describe it .", "red", "w5 w9"])
strings = mostly(words, odd_strings)
numbers = st.one_of(st.sampled_from(RAW_NUMBERS), st.integers(-2**70, 2**70), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_strings)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(odd_strings, inner, max_size=3)),
                        max_leaves=6)

urls = mostly(st.just(IMAGE), st.sampled_from(
    ["data:image/png;base64,@@", "data:text/plain;base64,aGk=", "data:image/png;base64,", "http://127.0.0.1:9/x.png",
     "file:///etc/passwd", "file:///tmp/a\x00b.png", "ftp://x/y", "data:image/png;base64," + "A" * 64, "\ud800"])
    | odd_strings)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": mostly(strings, anything)})
image_part = st.fixed_dictionaries({"type": st.just("image_url"),
                                    "image_url": mostly(st.fixed_dictionaries({"url": urls}), anything)})
bad_part = st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), anything, max_size=3) | anything
parts = st.lists(mostly(text_part | image_part, bad_part), min_size=1, max_size=3)
contents = mostly(strings | parts, anything)
roles = mostly(st.sampled_from(["user"]), st.sampled_from(["system", "developer", "assistant", "tool", "robot"])
               | anything)
user = st.fixed_dictionaries({"role": st.just("user"), "content": contents})
system = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]), "content": mostly(strings, anything)})
conversation = st.builds(lambda before, u, after: before + [u] + after,
                         st.lists(system, max_size=2), user, st.lists(system, max_size=1))
messages = mostly(conversation, st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), anything, max_size=3), max_size=2),
    anything))

# field -> values that mean something there, mixed with values of any type
FIELDS = {
    "model": mostly(st.just("tiny"), st.just("gpt-4o") | odd_strings),
    "max_tokens": mostly(st.integers(1, 6), numbers | anything),
    "max_completion_tokens": mostly(st.integers(1, 6), numbers),
    "temperature": mostly(st.sampled_from([0, 1]) | st.floats(0, 2), numbers | anything),
    "top_p": mostly(st.floats(0, 1), numbers), "top_k": mostly(st.integers(0, 50), numbers),
    "seed": mostly(st.integers(0, 2**63 - 1), numbers),
    "stop": mostly(st.lists(words, max_size=4), st.lists(odd_strings, max_size=6) | anything),
    "stream": mostly(st.booleans(), anything),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "reduce": mostly(st.sampled_from(["random:keep=4", "random:keep=4,seed=-3", "fastv:keep=4,layer=1", "pool:keep=4",
                                      "visionzip:keep=6,contextual=2", "sparsevlm:keep=8,recycle=1"]),
                     st.sampled_from(["fastv:keep=8,keep=9", "sparsevlm:keep=8,recycle=-5", "pdrop:keep=8,ratio=nan",
                                      "random:keep=4,seed=" + str(2**70), "fastv:keep=999", "nosuch"])
                     | odd_strings | anything),
    "response_format": mostly(st.just({"type": "text"}), st.just({"type": "json_object"}) | anything),
    "ignore_eos": mostly(st.booleans(), anything),
    "n": mostly(st.just(1), st.sampled_from([2, Raw("1.0"), True]) | numbers),
    "logprobs": mostly(st.just(False), scalars), "top_logprobs": mostly(st.just(0), numbers),
    "frequency_penalty": mostly(st.sampled_from([0, 0.0]), numbers), "presence_penalty": numbers,
    "logit_bias": mostly(st.just({}), anything), "tools": mostly(st.just([]), anything),
    "tool_choice": mostly(st.sampled_from(["none", "auto"]), anything), "user": strings,
    "metadata": mostly(st.dictionaries(words, words, max_size=2), anything),
}


@st.composite
def bodies(draw) -> bytes:
    body = {"messages": draw(messages)}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        body[key] = draw(FIELDS[key])
    if draw(st.integers(0, 9)) == 4:  # an unknown field
        body[draw(odd_strings)] = draw(anything)
    text = dump(body).encode()  # ASCII: json.dumps escapes everything else
    damage = draw(st.integers(0, 19))
    if damage == 7:  # broken JSON
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    elif damage == 13:  # not an object
        text = dump(draw(anything)).encode()
    return text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llava = fastllava.load(tiny_checkpoint(tmp_path_factory.mktemp("fuzz")), device="cpu")
    limits = Limits(max_body_bytes=200_000, max_images=2, max_tokens=8, default_max_tokens=4)
    with running_server(llava, Settings(model_id="tiny", limits=limits, max_batch_size=2)) as url:
        status, first = raw_request(url, "POST", "/v1/chat/completions", GOOD)
        assert status == 200, first
        yield url, first["choices"][0]["message"]["content"]


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_no_request_body_gets_a_500(server, body):
    base, _ = server
    status, obj = raw_request(base, "POST", "/v1/chat/completions", body)
    event(f"{status} {obj['error']['code'] if status >= 400 and isinstance(obj, dict) else ''}")
    assert status < 500, (status, obj)
    if status >= 400:
        assert isinstance(obj, dict) and set(obj) == {"error"}, obj
        err = obj["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert err["message"] and "\n" not in err["message"], err
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), err
    else:
        assert status == 200 and (isinstance(obj, dict) and obj["object"] == "chat.completion"
                                  or isinstance(obj, str) and obj.rstrip().endswith("data: [DONE]")), obj


def test_the_server_answers_as_before_after_the_fuzzing(server):
    base, first = server
    status, obj = raw_request(base, "POST", "/v1/chat/completions", GOOD)
    assert status == 200 and obj["choices"][0]["message"]["content"] == first, obj
    status, health = raw_request(base, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["active"] == 0, health
