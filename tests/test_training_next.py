"""Training a LLaVA-NeXT default model: AnyRes pieces map back onto the image exactly, every
visual token of a packed NeXT row is labelled with what lies under it, packing stays exact, and
a LLaVA-1.5 checkpoint continues as a NeXT one."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastllava
from fastllava import anyres
from fastllava.errors import UserError
from fastllava.evaluation.scenes import COLORS, random_scene, render
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words
from fastllava.models.llava_next import LlavaNextModel
from fastllava.prompts import PromptEncoder
from test_training import TINY
from training.guidance import Guidance, PatchHead, cls_guide_loss, patch_centres
from training.trainer import (IMAGE_TOKEN_ID, VOCAB_SIZE, Batches, TrainSpec, build_config, loss_on, packed_logits,
                              segment_mask, train, training_processor)

NEXT = {**TINY, "patch_size": 4, "anyres": True}  # 32-pixel tiles of 8 x 8 patches


def _next_model_and_data(questions: int):
    cfg = build_config(TrainSpec(**NEXT))
    torch.manual_seed(0)
    model = LlavaNextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    encoder = PromptEncoder(build_word_tokenizer(default_words(), IMAGE_TOKEN_ID, VOCAB_SIZE), IMAGE_TOKEN_ID,
                            cfg.image_features_per_image)
    return model, Batches(encoder, training_processor(cfg), cfg.vision.image_size, seed=3, questions=questions,
                          grid=cfg.vision.grid, variant="hires")


@pytest.mark.parametrize("size", [(32, 64), (40, 110), (100, 33), (64, 64), (17, 90)])
def test_piece_boxes_say_where_each_piece_shows_the_image(size):
    """A gradient image (red = x, green = y): the centre of every patch of every piece shows the
    colour of the image point piece_boxes puts there, and black padding outside the image."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx + 0.5) / w * 255, (yy + 0.5) / h * 255, np.full((h, w), 128.0)], -1)
    processor = training_processor(build_config(TrainSpec(**NEXT)))
    processor.pieces.mean = processor.pieces.std = None  # pixels in [0, 1]
    pieces = processor.one(Image.fromarray(arr.round().astype(np.uint8)))  # [K, 3, 32, 32]
    boxes = anyres.piece_boxes(size, processor.pinpoints, processor.tile)
    assert len(boxes) == len(pieces)
    grid = 8
    centres = patch_centres(boxes, grid)  # [K, 64, 2]
    at = ((np.arange(grid) + 0.5) * 4).astype(int)  # the pixel at each patch centre
    shown = pieces[:, :, at[:, None], at[None, :]].permute(0, 2, 3, 1).reshape(len(pieces), grid * grid, 3).numpy()
    inside = ((centres > 0.02) & (centres < 0.98)).all(-1)  # away from the image's edge (resampling blurs it)
    outside = ((centres < -0.05) | (centres > 1.05)).any(-1)
    assert inside.sum() > 0
    np.testing.assert_allclose(shown[inside][:, 0], centres[inside][:, 1], atol=0.05)  # red = x
    np.testing.assert_allclose(shown[inside][:, 1], centres[inside][:, 0], atol=0.05)  # green = y
    assert np.abs(shown[outside]).max(initial=0) < 1e-6  # padding


def test_next_batches_label_every_visual_token_with_what_lies_under_it():
    model, data = _next_model_and_data(questions=2)
    for _ in range(3):
        batch = data.batch(3)
        h, w = batch.image_sizes[0].tolist()
        assert (batch.image_sizes == batch.image_sizes[0]).all()  # one canvas per batch
        p = model.cfg.image_tokens(h, w)
        assert batch.patch_labels.shape[1] == p == batch.guide_mask.shape[-1]
        assert (batch.ids[:, batch.image_start:batch.image_start + p] == IMAGE_TOKEN_ID).all()
        assert ((batch.ids == IMAGE_TOKEN_ID).sum(1) == p).all()
        src, where = model.token_layout((h, w), anyres.tile_grid((h, w), model.cfg.image_grid_pinpoints, 32))
        newline = src < 0
        assert (batch.patch_labels[:, newline] == -100).all() and (batch.patch_labels[:, ~newline] >= 0).all()
        assert not batch.guide_mask[:, :, newline].any()
    # the colour label of a token is the colour drawn at its place in the image
    checked = 0
    colours = list(COLORS.values())
    for _ in range(10):
        _, _, image, labels = data.example(False)
        h, w = image.height, image.width
        src, where = model.token_layout((h, w), anyres.tile_grid((h, w), model.cfg.image_grid_pinpoints, 32))
        arr = np.asarray(image)
        for t in (labels[:, 1] > 0).nonzero()[:, 0].tolist():
            y, x = (where[t] * torch.tensor([h, w])).long().tolist()
            assert tuple(arr[y, x]) == colours[labels[t, 1] - 1]
            checked += 1
    assert checked > 20


@torch.no_grad()
def test_packed_next_rows_equal_single_question_prompts():
    model, data = _next_model_and_data(questions=3)
    batch = data.batch(2)
    packed, images, _ = packed_logits(model, batch)
    assert images["vision"].shape[:2] == batch.patch_labels.shape[:2]
    for row in range(2):
        for j in range(1, int(batch.segments[row].max()) + 1):
            cols = (batch.segments[row] == j).nonzero()[:, 0]
            single = torch.cat([batch.ids[row, batch.segments[row] == 0], batch.ids[row, cols]])[None]
            feats = model.image_features(batch.pixels[row:row + 1], batch.image_sizes[row:row + 1])
            ref = model(model.embed(single, feats), torch.arange(single.shape[1])[None], None)
            assert (packed[row, cols] - ref[0, -len(cols):]).abs().max().item() < 1e-5


def test_guided_probs_of_the_answer_queries_equal_the_full_attention():
    model, data = _next_model_and_data(questions=2)
    batch = data.batch(2)
    with torch.no_grad():
        _, _, taps = packed_logits(model, batch, (0,))
        x = model.embed(batch.ids, model.encode_images(batch.pixels, batch.image_sizes)["features"])
        cos, sin = model.language_model.rotary(batch.positions, x.dtype)
        _, full, _ = model.language_model.layers[0](x, cos, sin, segment_mask(batch.segments), None, 0, 0,
                                                     x.shape[1], "all")
    rows, pos = batch.guide_at.unbind(-1)
    assert len(rows) > 0
    torch.testing.assert_close(taps[0][0], full[rows, :, pos], atol=1e-6, rtol=1e-5)
    guidance, head = Guidance(model.cfg.text.hidden_size, layer=0), PatchHead(model.cfg.vision.hidden_size)
    loss, _, aux, guide = loss_on(model.train(), head, batch, 0.5, 1.0, guidance)
    loss.backward()
    assert aux > 0 and guide > 0 and model.image_newline.grad.abs().sum() > 0


def test_a_llava_checkpoint_continues_as_a_next_model(tmp_path):
    base = train(tmp_path / "llava", TrainSpec(**{**NEXT, "anyres": False}, align_steps=0, steps=1, batch_size=2,
                                               questions=2, save_every=0, guide_layer=0), log=lambda m: None)
    lines = []
    spec = TrainSpec(**NEXT, align_steps=0, steps=1, batch_size=2, questions=2, save_every=0, guide_layer=0)
    out = train(tmp_path / "next", spec, log=lines.append, init=base)
    assert "image_newline from random" in lines[0]
    model = fastllava.load(out, device="cpu")
    assert model.config.is_next and model.config.image_grid_pinpoints == [(32, 64), (64, 32), (64, 64), (96, 32),
                                                                          (32, 96)]
    assert model.config.text.max_position_embeddings == 4096  # a NeXT context, not LLaVA-1.5's 1024
    scene_image = render(random_scene(np.random.default_rng(0), "hires", (1, 3)), 32)  # 96 x 32 pixels
    r = model.generate(images=[scene_image], prompts=["What color is the star?"], max_new_tokens=2)[0]
    assert r.stats["image_tokens"] == model.config.image_tokens(32, 96)
    with pytest.raises(UserError, match="--anyres"):
        train(tmp_path / "again", TrainSpec(**{**NEXT, "anyres": False}, align_steps=0, steps=1, batch_size=2,
                                            questions=2, save_every=0, guide_layer=0), log=lambda m: None, init=out)


def test_cls_guide_loss_asks_each_piece_to_attend_to_its_own_objects():
    objects = torch.tensor([[True, False, False, False, True, False]])
    part = torch.tensor([[0, 0, 0, 1, 1, -1]])  # two pieces of 3 and 2 patches, then a newline
    on = torch.tensor([[0.9, 0.05, 0.05, 0.05, 0.95, 0.0]])
    off = torch.tensor([[0.05, 0.9, 0.05, 0.95, 0.05, 0.0]])
    assert cls_guide_loss(on, objects, part) < 0.1 < 2.0 < cls_guide_loss(off, objects, part)
    # a piece without objects does not count: only piece 0 does here
    lone = torch.tensor([[True, False, False, False, False, False]])
    assert torch.isclose(cls_guide_loss(off, lone, part), -torch.log(torch.tensor(0.05 + 1e-6)))
    assert torch.isclose(cls_guide_loss(on[:, :3], objects[:, :3], None), -torch.log(torch.tensor(0.9 + 1e-6)))


def test_the_class_token_loss_trains_the_class_token():
    model, data = _next_model_and_data(questions=2)
    batch = data.batch(2)
    loss, _, aux, _ = loss_on(model.train(), None, batch, cls_weight=1.0, cls_early_block=1)
    assert aux > 0
    loss.backward()
    assert model.vision_tower.embeddings.class_embedding.grad.abs().sum() > 0
    assert model.language_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0  # the answers' loss too
