"""Text in, text out: prompts, batching with padding, streaming, stop strings, stats, CLI run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava.evaluation.tokenizer import build_word_tokenizer
from fastllava.generation import MIN_TEMPERATURE
from hf_reference import IMAGE_TOKEN, VOCAB, save_checkpoint, tiny_llava

WORDS = ["user", "assistant", ":", "?", ".", "what", "color", "is", "the", "circle", "square", "red", "blue",
         "green", "how", "many", "are", "there", "describe", "it", "a", "an", "image", "of", "shape"]
WORDS += [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]  # every id decodes to a word


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_checkpoint(tiny_llava(seed=11), tmp_path_factory.mktemp("tok"), "new")
    tok = build_word_tokenizer(WORDS, image_token_id=IMAGE_TOKEN, vocab_size=VOCAB)
    tok.save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return fastllava.load(ckpt, device="cpu")


def _image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def test_prompt_format_and_image_expansion(model):
    text = model.prompts.format("what color is the circle ?")
    assert text == "USER: <image>\nwhat color is the circle ? ASSISTANT:"
    ids = model.prompts.prompt_ids("what color is the circle ?")
    assert ids[0] == 1  # BOS from the tokenizer's post-processor
    assert ids.count(IMAGE_TOKEN) == model.config.image_features_per_image == 16
    assert 0 not in ids  # every word is known


def test_generate_equals_generate_ids(model):
    img = _image(0)
    out = model.generate(images=[img], prompts=["what color is the circle ?"], max_new_tokens=12)[0]
    ids, mask, pixels = model.encode([img], ["what color is the circle ?"])
    ref = model.generate_ids(ids, pixels, mask, max_new_tokens=12)[0].tolist()
    eos = model.config.text.eos_token_id
    cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
    assert out.token_ids == ref[:cut]
    assert out.text == model.prompts.decode(ref[:cut])
    assert out.finish_reason == ("stop" if cut < len(ref) else "length")


def test_batch_with_padding_equals_one_at_a_time(model):
    images = [_image(1), _image(2), None]
    prompts = ["what color is the circle ?", "describe it .", "how many red circle are there ?"]
    batched = model.generate(images=images, prompts=prompts, max_new_tokens=10)
    for img, prompt, got in zip(images, prompts, batched):
        alone = model.generate(images=[img], prompts=[prompt], max_new_tokens=10)[0]
        assert got.token_ids == alone.token_ids
    assert batched[2].stats["image_tokens"] == 0 and batched[0].stats["image_tokens"] == 16


def test_stream_concatenates_to_generate_and_has_stats(model):
    img = _image(3)
    full = model.generate(images=[img], prompts=["describe it ."], max_new_tokens=16)[0]
    stream = model.stream(image=img, prompt="describe it .", max_new_tokens=16)
    deltas = list(stream)
    assert "".join(deltas) == full.text
    assert len(deltas) >= 2
    s = stream.result.stats
    assert s["generated_tokens"] == full.stats["generated_tokens"] >= 1
    assert s["prompt_tokens"] + s["image_tokens"] == len(model.prompts.prompt_ids("describe it ."))
    assert s["ttft_s"] > 0 and s["total_s"] >= s["ttft_s"]


def test_stop_strings_truncate(model):
    img = _image(4)
    full = model.generate(images=[img], prompts=["describe it ."], max_new_tokens=16)[0]
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = model.generate(images=[img], prompts=["describe it ."], max_new_tokens=16, stop=[stop])[0]
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_sampling_seeded_and_validated(model):
    img = _image(5)
    kw = dict(images=[img], prompts=["describe it ."], max_new_tokens=12, temperature=1.0, top_p=0.95)
    assert model.generate(seed=1, **kw)[0].token_ids == model.generate(seed=1, **kw)[0].token_ids
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=-0.1), dict(top_p=1.5),
                dict(top_k=-2), dict(max_new_tokens=0), dict(seed=2**70), dict(seed=True)):
        with pytest.raises(fastllava.UserError):
            model.generate(images=[img], prompts=["x"], **{"max_new_tokens": 4, **bad})
    with pytest.raises(fastllava.UserError, match="one image"):
        model.generate(images=[img, img], prompts=["x"])


def test_tiny_temperatures_are_greedy(model):
    """Below MIN_TEMPERATURE sampling is greedy: dividing logits by 1e-300 would give inf and NaN.
    So is top_p 0, and a top_p that rounds to 0 in float32 keeps the most likely token."""
    kw = dict(images=[_image(5)], prompts=["describe it ."], max_new_tokens=12)
    greedy = model.generate(**kw)[0].token_ids
    for t in (1e-300, MIN_TEMPERATURE / 2):
        assert model.generate(temperature=t, seed=3, **kw)[0].token_ids == greedy
    for p in (0.0, 1e-300):
        assert model.generate(temperature=1.0, top_p=p, seed=3, **kw)[0].token_ids == greedy


def test_chat_template_is_used_when_shipped(ckpt, tmp_path):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    m = fastllava.load(tmp_path, device="cpu")
    assert m.prompts.format("what is it ?") == "USER: <image> what is it ? ASSISTANT:"
    assert m.generate(images=[_image(6)], prompts=["what is it ?"], max_new_tokens=3)[0].stats["image_tokens"] == 16


LLAVA_HF_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_llava_hf_style_template_gives_the_llava_prompt(ckpt, tmp_path):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text(LLAVA_HF_STYLE_TEMPLATE)
    m = fastllava.load(tmp_path, device="cpu")
    assert m.prompts.format("what is it ?") == "USER: <image>\nwhat is it ? ASSISTANT:"
    (tmp_path / "chat_template.jinja").write_text("{% if messages %}{{ raise_exception('no') }}{% endif %}")
    with pytest.raises(fastllava.UserError, match="chat template failed"):
        fastllava.load(tmp_path, device="cpu").prompts.format("x")
    (tmp_path / "chat_template.jinja").write_text("{% for x in %}")
    with pytest.raises(fastllava.UserError, match="does not parse"):
        fastllava.load(tmp_path, device="cpu")


def test_cli_run_json_and_stream(ckpt, model, tmp_path):
    img = _image(7)
    img.save(tmp_path / "img.png")
    args = [sys.executable, "-m", "fastllava.cli", "run", "--model", str(ckpt), "--image", str(tmp_path / "img.png"),
            "--prompt", "describe it .", "--max-new-tokens", "8"]
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    expected = model.generate(images=[tmp_path / "img.png"], prompts=["describe it ."], max_new_tokens=8)[0]
    assert obj["text"] == expected.text
    assert obj["stats"]["generated_tokens"] == expected.stats["generated_tokens"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == expected.text.strip()
    assert "TTFT" in r.stderr and "tok/s" in r.stderr


def test_logits_are_float32_of_right_shape(model):
    ids, mask, pixels = model.encode([_image(8)], ["what is it ?"])
    out = model.logits(ids, pixels, mask)
    assert out.dtype == torch.float32 and out.shape == (1, ids.shape[1], VOCAB)
