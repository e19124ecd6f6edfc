"""save_model writes checkpoints that transformers and fastllava both load to the same numbers."""

import torch

import fastllava
from fastllava.checkpoint import save_model
from fastllava.models.llava import LlavaModel
from hf_reference import batch_inputs
from training.trainer import TrainSpec, build_config


def test_saved_checkpoint_loads_in_transformers_and_back(tmp_path):
    from transformers import LlavaForConditionalGeneration

    spec = TrainSpec(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, text_hidden=64,
                     text_layers=2)
    torch.manual_seed(0)
    model = LlavaModel(build_config(spec)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = save_model(model, tmp_path / "m")
    ids, mask, pixels = batch_inputs(16)
    ids[ids == model.cfg.image_token_index] = 4  # text tokens must not collide with the image token
    ids[ids == 100] = model.cfg.image_token_index
    ours = fastllava.load(path, device="cpu")
    got = ours.logits(ids, pixels, mask)
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4
    with torch.no_grad():
        direct = model(model.embed(ids, model.image_features(pixels)),
                       torch.arange(ids.shape[1]).expand_as(ids), real)
    assert (got[real] - direct[real]).abs().max().item() <= 1e-5
