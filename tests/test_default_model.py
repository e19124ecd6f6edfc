"""The embedded default model: loads in transformers, agrees with it, and runs from the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastllava
from fastllava.assets import default_model_dir
from fastllava.evaluation.questions import ASK, prompt
from fastllava.evaluation.scenes import random_scene, render

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def model():
    return fastllava.load(device="cpu")


def test_checkpoint_is_small_and_hf_shaped():
    d = default_model_dir()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 20 * 2**20


def test_576_visual_tokens(model):
    assert model.config.image_features_per_image == 576


def test_transformers_gives_the_same_greedy_answers(model):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(default_model_dir()).eval()
    rng = np.random.Generator(np.random.PCG64(123))
    checked = 0
    while checked < 6:
        scene = random_scene(rng)
        family = list(ASK)[checked % len(ASK)]
        q = ASK[family](scene, rng)
        if q is None:
            continue
        ids, mask, pixels = model.encode([render(scene, 96)], [prompt(q.question)])
        ours = model.generate_ids(ids, pixels, mask, max_new_tokens=6)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6,
                              do_sample=False)[:, ids.shape[1]:]
        n = ref.shape[1]  # transformers stops at EOS; ours pads after it
        assert torch.equal(ours[:, :n], ref), (q.question, ours, ref)
        checked += 1


def test_cli_run_uses_the_embedded_model():
    r = subprocess.run([sys.executable, "-m", "fastllava.cli", "run", "--image", str(EXAMPLES / "shapes_2.png"),
                        "--prompt", "What color is the star? Answer with one word.", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"image_tokens": 576' in r.stdout


def test_embedded_model_beats_answer_priors_on_a_fresh_set(model, tmp_path):
    """The shipped model reads the image: on questions it never saw (seed far below the training
    streams'), it beats the best image-blind guess — the most frequent answer of each family in
    this very set (0.41 here) — by far. The committed v4 model scores 0.975 on this set (0.968 on
    the README's 1002 held-out questions); the bound leaves room for float differences between
    machines, not for a weaker model."""
    from fastllava.evaluation import evaluate, generate_dataset, load_dataset
    from fastllava.evaluation.scoring import answer_prior

    generate_dataset(120, 4242, tmp_path / "fresh", image_size=96, progress=False)
    data = load_dataset(tmp_path / "fresh")
    prior = answer_prior(data.samples)
    result = evaluate(model, data, batch_size=40, progress=False)
    assert result["overall"]["n"] == 120
    assert result["overall"]["accuracy"] >= max(0.93, prior + 0.5), (result["overall"], prior)
