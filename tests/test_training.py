"""Training of the embedded model: packed rows are exact, and a tiny run writes a loadable model."""

import torch

import fastllava
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words
from fastllava.images import ImageProcessor
from fastllava.models.llava import LlavaModel
from fastllava.prompts import PromptEncoder
from fastllava.training import (IMAGE_TOKEN_ID, VOCAB_SIZE, Batches, TrainSpec, build_config, loss_on,
                                packed_logits, segment_mask, train)

TINY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, text_hidden=64, text_layers=2)


def _tiny_model_and_data(questions: int):
    spec = TrainSpec(**TINY)
    torch.manual_seed(0)
    model = LlavaModel(build_config(spec)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    tokenizer = build_word_tokenizer(default_words(), IMAGE_TOKEN_ID, VOCAB_SIZE)
    encoder = PromptEncoder(tokenizer, IMAGE_TOKEN_ID, model.cfg.image_features_per_image)
    processor = ImageProcessor(shortest_edge=spec.image_size, crop_hw=(spec.image_size, spec.image_size))
    return model, Batches(encoder, processor, spec.image_size, seed=5, questions=questions)


def test_segment_mask_sees_prefix_and_own_segment_only():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = segment_mask(seg)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False, False]
    assert m[5].tolist() == [True, True, False, False, True, True, False]
    assert m[6].tolist() == [False] * 6 + [True]  # padding sees only padding


@torch.no_grad()
def test_packed_segments_equal_single_question_prompts():
    model, data = _tiny_model_and_data(questions=4)
    ids, positions, segments, targets, pixels, families = data.batch(2)
    assert int(segments.max()) >= 2, "rows should hold several questions"
    packed = packed_logits(model, ids, positions, segments, pixels)  # [B, T, V]
    for row in range(2):
        for j in range(1, int(segments[row].max()) + 1):
            cols = (segments[row] == j).nonzero()[:, 0]
            single = torch.cat([ids[row, segments[row] == 0], ids[row, cols]])[None]  # [1, T1]
            ref = model(model.embed(single, model.image_features(pixels[row:row + 1])),
                        torch.arange(single.shape[1])[None], None)
            assert (packed[row, cols] - ref[0, -len(cols):]).abs().max().item() < 1e-5
    assert len(families) == int((targets != -100).sum())
    loss, per = loss_on(model, ids, positions, segments, targets, pixels)
    assert per.shape == (len(families),) and torch.isclose(loss, per.mean())


def test_tiny_training_run_writes_a_loadable_model(tmp_path):
    spec = TrainSpec(**TINY, align_steps=1, steps=2, batch_size=2, questions=2, save_every=0)
    lines = []
    out = train(tmp_path / "m", spec, log=lines.append)
    model = fastllava.load(out, device="cpu")
    r = model.generate(images=[torch.zeros(32, 32, 3).numpy()], prompts=["What color is the star?"],
                       max_new_tokens=3)[0]
    assert r.stats["image_tokens"] == 16
    assert any("instruct step 2/2" in line for line in lines)
