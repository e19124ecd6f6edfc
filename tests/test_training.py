"""Training of the embedded model: packed rows are exact, and a tiny run writes a loadable model."""

import dataclasses

import pytest
import torch

import fastllava
from fastllava.errors import UserError
from fastllava.evaluation.scenes import COLORS, SHAPES, SIZES, Scene, SceneObject
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words
from fastllava.images import ImageProcessor
from fastllava.models.llava import LlavaModel
from fastllava.prompts import PromptEncoder
from training.guidance import (ATTRIBUTES, Guidance, guide_loss, looked_at, named_objects, object_attributes,
                               patch_labels, relative_direction)
from training.trainer import (IMAGE_TOKEN_ID, VOCAB_SIZE, Batches, TrainSpec, build_config, loss_on, packed_logits,
                              segment_mask, train)

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
    return model, Batches(encoder, processor, spec.image_size, seed=5, questions=questions, grid=model.cfg.vision.grid)


def test_segment_mask_sees_prefix_and_own_segment_only():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = segment_mask(seg)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False, False]
    assert m[5].tolist() == [True, True, False, False, True, True, False]
    assert m[6].tolist() == [False] * 6 + [True]  # padding sees only padding


@torch.no_grad()
def test_packed_segments_equal_single_question_prompts():
    model, data = _tiny_model_and_data(questions=4)
    batch = data.batch(2)
    ids, segments, pixels = batch.ids, batch.segments, batch.pixels
    assert int(segments.max()) >= 2, "rows should hold several questions"
    packed, _, _ = packed_logits(model, batch)  # [B, T, V]
    for row in range(2):
        for j in range(1, int(segments[row].max()) + 1):
            cols = (segments[row] == j).nonzero()[:, 0]
            single = torch.cat([ids[row, segments[row] == 0], ids[row, cols]])[None]  # [1, T1]
            ref = model(model.embed(single, model.image_features(pixels[row:row + 1])),
                        torch.arange(single.shape[1])[None], None)
            assert (packed[row, cols] - ref[0, -len(cols):]).abs().max().item() < 1e-5
    assert len(batch.families) == int((batch.targets != -100).sum())
    loss, per, aux, guide = loss_on(model, None, batch)
    assert per.shape == (len(batch.families),) and torch.isclose(loss, per.mean()) and aux == 0 and guide == 0


def test_tiny_training_run_writes_a_loadable_model(tmp_path):
    spec = TrainSpec(**TINY, vision_steps=1, align_steps=1, steps=2, batch_size=2, questions=2, save_every=0,
                     guide_layer=0)
    lines = []
    out = train(tmp_path / "m", spec, log=lines.append)
    model = fastllava.load(out, device="cpu")
    r = model.generate(images=[torch.zeros(32, 32, 3).numpy()], prompts=["What color is the star?"],
                       max_new_tokens=3)[0]
    assert r.stats["image_tokens"] == 16
    assert [line.split()[0] for line in lines] == ["vision", "align", "instruct"]
    assert "instruct step 2/2" in lines[-1]
    again = []  # continuing from it picks up the training heads too, so they do not restart
    train(tmp_path / "m2", TrainSpec(**TINY, vision_steps=0, align_steps=0, steps=1, batch_size=2, questions=2,
                                     save_every=0, guide_layer=0), log=again.append, init=out)
    assert not any("random weights" in line for line in again), again
    (out / "training_heads.safetensors").unlink()
    fresh = []
    train(tmp_path / "m3", TrainSpec(**TINY, vision_steps=0, align_steps=0, steps=1, batch_size=2, questions=2,
                                     save_every=0, guide_layer=0), log=fresh.append, init=out)
    assert "training heads start from random weights" in fresh[0]
    with pytest.raises(UserError, match="--guide-layer must be in"):
        train(tmp_path / "bad", TrainSpec(**TINY, steps=1, guide_layer=1))


def test_patch_labels_follow_the_scene():
    scene = Scene((SceneObject("square", "blue", "large", 0.25, 0.25, SIZES["large"]),
                   SceneObject("circle", "red", "small", 0.75, 0.75, SIZES["small"])), "plain", 220, 0)
    labels = patch_labels(scene, grid=24, image_size=96).view(24, 24, 6)
    shape, color, size, centre, row, col = labels.unbind(-1)
    assert row[0, 23] == 0 and col[0, 23] == 11 and row[23, 0] == 11 and row[13, 5] == 6 and col[13, 5] == 2
    assert shape[6, 6] == SHAPES.index("square") + 1 and color[6, 6] == list(COLORS).index("blue") + 1
    assert shape[18, 18] == SHAPES.index("circle") + 1 and size[18, 18] == list(SIZES).index("small") + 1
    assert shape[0, 23] == 0 and color[12, 0] == 0  # background
    assert centre.sum() == 2 and centre[6, 6] == 1 and centre[18, 18] == 1
    # the square covers more patches than the small circle
    assert (shape == SHAPES.index("square") + 1).sum() > (shape == SHAPES.index("circle") + 1).sum() > 4


def test_named_objects_point_at_what_the_question_names():
    objs = (SceneObject("square", "blue", "large", 0.2, 0.2, SIZES["large"]),
            SceneObject("circle", "red", "small", 0.8, 0.8, SIZES["small"]),
            SceneObject("circle", "blue", "small", 0.3, 0.5, SIZES["small"]),
            SceneObject("star", "green", "small", 0.75, 0.2, SIZES["small"]))
    scene = Scene(objs, "plain", 220, 0)
    assert named_objects(scene, "What shape is the red object?") == {1}
    assert named_objects(scene, "How many circles are there?") == {1, 2}
    assert named_objects(scene, "How many blue objects are there?") == {0, 2}
    assert named_objects(scene, "Is the red circle left of the blue square?") == {0, 1}
    assert named_objects(scene, "Is there a green square?") == {0, 3}  # absent pair: either attribute
    assert named_objects(scene, "Is there a purple cross?") == set()
    # the object nearest to the blue square (0.2, 0.2) is the blue circle (0.3, 0.5)
    assert named_objects(scene, "What color is the object nearest to the blue square?") == {0, 2}


def test_guide_loss_is_low_only_when_attention_sits_on_the_named_patches():
    relevant = torch.zeros(2, 8, dtype=torch.bool)
    relevant[:, 2:4] = True
    on = torch.zeros(2, 8)
    on[:, 2] = 0.6
    on[:, 3] = 0.4
    spread = torch.full((2, 8), 1 / 8)
    assert guide_loss(on, relevant).item() < 1e-3
    assert abs(guide_loss(spread, relevant).item() - torch.log(torch.tensor(4.0)).item()) < 1e-4


def test_guided_batches_mark_answer_positions_and_looked_at_patches():
    model, data = _tiny_model_and_data(questions=4)
    batch = data.batch(3)
    n, p = len(batch.guide_at), model.cfg.vision.num_patches
    assert n > 0 and batch.guide_mask.shape == (n, 3, p) and batch.guide_attrs.shape == (n, 3, len(ATTRIBUTES))
    assert bool(batch.guide_mask[:, 0].any(-1).all())
    assert (batch.ids[:, batch.image_start:batch.image_start + p] == IMAGE_TOKEN_ID).all()
    rows, at = batch.guide_at.unbind(-1)
    assert (batch.targets[rows, at] != -100).all()  # each guided position predicts an answer token
    assert (batch.targets[rows, at - 1] == -100).all()  # ... the first one of its answer
    one = batch.guide_attrs[:, 0, 0] >= 0  # questions whose first thing is one object
    assert one.any() and (batch.guide_mask[one, 0].sum(-1) > 0).all()
    guidance = Guidance(model.cfg.text.hidden_size, layer=0)
    loss, _, _, guide = loss_on(model, None, batch, guide_weight=1.0, guidance=guidance)
    assert guide > 0 and torch.isfinite(loss)
    loss.backward()
    assert guidance.read_named.proj.weight.grad.abs().sum() > 0 and guidance.read_answer.proj.weight.grad is not None
    assert batch.guide_dirs.shape == (n, 2) and (batch.guide_dirs >= 0).any()
    assert guidance.read_direction.weight.grad.abs().sum() > 0


def test_looked_at_orders_the_named_things_and_finds_the_answer_object():
    objs = (SceneObject("square", "blue", "large", 0.2, 0.2, SIZES["large"]),
            SceneObject("circle", "red", "small", 0.8, 0.8, SIZES["small"]),
            SceneObject("circle", "blue", "small", 0.3, 0.5, SIZES["small"]))
    scene = Scene(objs, "plain", 220, 0)
    assert looked_at(scene, "Is the red circle left of the blue square?") == ({1}, {0}, {0, 1})
    assert looked_at(scene, "What color is the object nearest to the blue square?") == ({0}, {0}, {2})
    assert looked_at(scene, "How many circles are there?") == ({1, 2}, {1, 2}, {1, 2})


def test_relative_direction_of_the_first_named_object():
    objs = (SceneObject("square", "blue", "large", 0.2, 0.2, SIZES["large"]),
            SceneObject("circle", "red", "small", 0.8, 0.8, SIZES["small"]),
            SceneObject("circle", "blue", "small", 0.8, 0.25, SIZES["small"]))
    scene = Scene(objs, "plain", 220, 0)
    assert relative_direction(scene, {1}, {0}) == (1, 1)  # right of and below the square
    assert relative_direction(scene, {0}, {1}) == (0, 0)
    assert relative_direction(scene, {2}, {0}) == (1, -100)  # level with it
    assert relative_direction(scene, {0}, {0}) == (-100, -100) == relative_direction(scene, {1, 2}, {0})


def test_object_attributes_only_for_a_single_object():
    scene = Scene((SceneObject("star", "green", "small", 0.2, 0.9, SIZES["small"]),
                   SceneObject("circle", "red", "small", 0.8, 0.8, SIZES["small"])), "plain", 220, 0)
    assert object_attributes(scene, {1}) == (SHAPES.index("circle"), list(COLORS).index("red"), 9, 9)
    assert object_attributes(scene, {0}) == (SHAPES.index("star"), list(COLORS).index("green"), 2, 10)
    assert object_attributes(scene, {0, 1}) == (-100,) * 4 == object_attributes(scene, set())


def test_worker_batches_differ_by_worker_and_follow_the_family_weights():
    _, data = _tiny_model_and_data(questions=2)
    stream = data.stream(2, captions=False, workers=2)
    first = [next(stream) for _ in range(2)]  # one from each worker
    assert not torch.equal(first[0].pixels, first[1].pixels)
    data.family_weights.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # shape questions only
    later = [next(stream) for _ in range(14)][-4:]  # past the batches made before the change
    assert {f for b in later for f in b.families if f is not None} == {"shape"}
    assert first[0].ids.shape[0] == 2 and first[0].pixels.shape[0] == 2


def test_position_questions_mark_the_side_word_they_ask_about():
    model, data = _tiny_model_and_data(questions=2)
    data.family_weights.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]))  # position questions only
    batch = data.batch(6)
    rows, at = batch.guide_at.unbind(-1)
    word_at, side = batch.guide_side.unbind(-1)
    asks = word_at >= 0
    assert asks.any() and (side[asks] >= 0).all() and (side[~asks] == -100).all()
    side_ids = torch.tensor(data.side_ids)
    assert (batch.ids[rows[asks], word_at[asks]] == side_ids[side[asks]]).all()  # the word itself
    assert (word_at[asks] < at[asks]).all()  # in the question, before the answer
    guidance = Guidance(model.cfg.text.hidden_size, layer=0)
    loss, _, _, _ = loss_on(model, None, batch, guide_weight=1.0, guidance=guidance)
    loss.backward()
    assert guidance.read_side.weight.grad.abs().sum() > 0


def test_heads_stage_leaves_the_model_unchanged(tmp_path):
    spec = TrainSpec(**TINY, vision_steps=0, align_steps=0, head_steps=2, steps=0, batch_size=2, questions=2,
                     save_every=0, guide_layer=0)
    first = train(tmp_path / "a", TrainSpec(**TINY, vision_steps=0, align_steps=0, steps=1, batch_size=2,
                                            questions=2, save_every=0, guide_layer=0), log=lambda m: None)
    before = fastllava.load(first, device="cpu").model.state_dict()
    after = fastllava.load(train(tmp_path / "b", spec, log=lambda m: None, init=first), device="cpu").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_describe_answers_are_guided_onto_each_object_left_to_right():
    model, data = _tiny_model_and_data(questions=1)
    data = Batches(data.encoder, data.processor, data.image_size, seed=7, questions=1, grid=data.grid,
                   families=("describe",))
    tok = data.encoder.tokenizer
    looked = 0
    for _ in range(6):
        (seg, targets, family, guides), = data.example(False)[1]
        answer = tok.decode([t for t in targets if t >= 0][:-1])
        objects = answer.count(" a ") + 1  # "a small red circle, a large blue star and ..."
        assert family == "describe" and len(guides) == objects >= 1
        for n, (offset, masks, attrs, dirs, side) in enumerate(guides):
            assert seg[offset] == tok.token_to_id("a") and tok.id_to_token(targets[offset]) in SIZES
            assert torch.equal(masks[0], masks[1]) and dirs == (-100, -100) and side == (-1, -100)
            if n == 0:  # nothing listed before the first object
                assert not masks[0].any() and attrs[0, 0] == -100
            else:  # the first hop: the object listed just before, the second: this one
                assert torch.equal(masks[0], guides[n - 1][1][2]) and torch.equal(attrs[0], guides[n - 1][2][2])
            looked += bool(masks[2].any())  # (a small object may cover no patch centre of 4 x 4)
        xs = [int(a[2, 2]) for _, _, a, _, _ in guides]  # each object's column on the probes' grid
        assert xs == sorted(xs)  # left to right, as the answer lists them
    assert looked > 0
    batch = data.batch(2)
    assert len(batch.guide_at) >= 2 and (batch.targets[batch.guide_at[:, 0], batch.guide_at[:, 1]] >= 0).all()


def test_scenes_rendered_at_several_sizes_reach_the_model_at_its_own():
    _, data = _tiny_model_and_data(questions=1)
    data = Batches(data.encoder, data.processor, data.image_size, seed=3, questions=1, grid=data.grid,
                   render_sizes=(32, 128))
    shapes = {data.example(False, size=s)[2].size for s in (32, 128)}
    assert shapes == {(32, 32), (128, 128)}
    assert all(data.batch(2).pixels.shape[-2:] == (32, 32) for _ in range(4))
    assert TrainSpec(**TINY, render_sizes="32,128").render_size_list() == (32, 128)
    assert TrainSpec(**TINY).render_size_list() == (32,)
    assert TrainSpec(families="color, describe").family_list() == ("color", "describe")
    for bad in (dict(render_sizes="16"), dict(render_sizes="a,b"), dict(families="color,colour"), dict(families="")):
        with pytest.raises(UserError):
            spec = TrainSpec(**{**TINY, **bad})
            spec.render_size_list(), spec.family_list()


@torch.no_grad()
def test_hidden_background_tokens_act_as_if_removed_from_the_prompt():
    """drop_background hides background visual tokens: each segment's logits equal those of its
    one-question prompt with those tokens taken out (the others keeping their positions), as a
    reduction that drops them leaves the prompt; object tokens and text are never hidden."""
    model, data = _tiny_model_and_data(questions=2)
    data.drop_background = 1.0
    batch = data.batch(3)
    assert batch.hidden is not None and bool(batch.hidden.any())
    image = slice(batch.image_start, batch.image_start + batch.patch_labels.shape[1])
    assert not batch.hidden[:, :image.start].any() and not batch.hidden[:, image.stop:].any()
    assert not (batch.hidden[:, image] & (batch.patch_labels[..., 0] > 0)).any()  # objects stay
    packed, _, _ = packed_logits(model, batch)
    unmasked, _, _ = packed_logits(model, dataclasses.replace(batch, hidden=None))
    for row in range(3):
        shown = ~batch.hidden[row]
        for j in range(1, int(batch.segments[row].max()) + 1):
            cols = (batch.segments[row] == j).nonzero()[:, 0]
            keep = torch.cat([shown[batch.segments[row] == 0], torch.ones(len(cols), dtype=torch.bool)])
            single = torch.cat([batch.ids[row, batch.segments[row] == 0], batch.ids[row, cols]])[None]  # [1, T1]
            embeds = model.embed(single, model.image_features(batch.pixels[row:row + 1]))[:, keep]
            ref = model(embeds, torch.arange(single.shape[1])[None, keep], None)
            assert (packed[row, cols] - ref[0, -len(cols):]).abs().max().item() < 1e-5
    assert (packed - unmasked)[batch.targets != -100].abs().max() > 1e-3  # hiding changed the answers' logits
    data.drop_background = 0.0
    assert data.batch(2).hidden is None
    with pytest.raises(UserError, match="drop-background"):
        train("unused", TrainSpec(**TINY, drop_background=1.5))
