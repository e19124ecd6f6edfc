"""Train the embedded default model: a small LLaVA-1.5-architecture model (CLIP-style ViT with a
class token giving a 24 x 24 = 576-token grid, MLP projector, Llama decoder, word tokenizer) on
procedurally generated shapes scenes, then save it as a Hugging Face LLaVA checkpoint.

Two stages as LLaVA does: (1) alignment on scene captions with only the projector trained,
(2) instruction tuning on question/answer pairs of every family with everything trained (the
tower starts from random weights here, so stage 2 trains it too). Stage 1 can be set to zero steps.
Data is generated on the fly from seeds that evaluation sets never use (see TRAIN_SEED_BASE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model, save_model
from .config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from .errors import UserError
from .evaluation.progress import Progress
from .evaluation.questions import ASK, FAMILIES, STRATEGIES, all_pairs, ask_exist, prompt
from .evaluation.scenes import caption, random_scene, render
from .evaluation.tokenizer import build_word_tokenizer, default_words, write_preprocessor_config
from .images import ImageProcessor
from .models.llava import LlavaModel
from .prompts import PromptEncoder

TRAIN_SEED_BASE = 10_000_000  # training streams use seeds >= this; evaluation sets use small seeds
IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 128
CAPTION_PROMPT = "Describe the image."


@dataclass
class TrainSpec:
    image_size: int = 96
    patch_size: int = 4  # 96 / 4 = 24 -> 576 visual tokens, like LLaVA-1.5
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    align_steps: int = 200
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


def build_config(spec: TrainSpec) -> LlavaConfig:
    vision = VisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                          num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                          image_size=spec.image_size, patch_size=spec.patch_size)
    text = TextConfig(vocab_size=VOCAB_SIZE, hidden_size=spec.text_hidden, intermediate_size=3 * spec.text_hidden,
                      num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                      num_key_value_heads=spec.text_kv_heads, head_dim=spec.text_hidden // spec.text_heads,
                      max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=[2],
                      pad_token_id=0, rope=RopeConfig())
    return LlavaConfig(vision=vision, text=text, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layers=[-1], vision_feature_select_strategy="default")


class Batches:
    """Endless stream of (input_ids [B, T], labels [B, T], pixel_values [B, 3, H, W]); labels are
    -100 except on the answer and its EOS. Right padding: causal attention never looks ahead."""

    def __init__(self, encoder: PromptEncoder, processor: ImageProcessor, image_size: int, seed: int):
        self.encoder, self.processor, self.image_size = encoder, processor, image_size
        self.rng = np.random.Generator(np.random.PCG64(TRAIN_SEED_BASE + seed))
        self.popular = all_pairs()  # frequency order is learned from data; any order trains all pairs

    def example(self, captions: bool) -> tuple[list[int], list[int], object]:
        while True:
            scene = random_scene(self.rng)
            if captions:
                question, answer = CAPTION_PROMPT, caption(scene)
                break
            family = FAMILIES[int(self.rng.integers(len(FAMILIES)))]
            if family == "exist":
                q = ask_exist(scene, self.rng, ("yes", "no")[int(self.rng.integers(2))],
                              STRATEGIES[int(self.rng.integers(len(STRATEGIES)))], self.popular)
            else:
                q = ASK[family](scene, self.rng)
            if q is not None:
                question, answer = prompt(q.question), q.answer
                break
        ids = self.encoder.prompt_ids(question)
        answer_ids = self.encoder.tokenizer.encode(answer, add_special_tokens=False).ids + [2]
        return ids + answer_ids, [-100] * len(ids) + answer_ids, render(scene, self.image_size)

    def batch(self, size: int, captions: bool = False):
        rows = [self.example(captions) for _ in range(size)]
        longest = max(len(r[0]) for r in rows)
        ids = torch.zeros(size, longest, dtype=torch.long)
        labels = torch.full((size, longest), -100, dtype=torch.long)
        for i, (x, y, _) in enumerate(rows):
            ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
        return ids, labels, self.processor([r[2] for r in rows])


def loss_on(model: LlavaModel, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    embeds = model.embed(ids, model.image_features(pixels))
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = model(embeds, positions, None)  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def train(out_dir: str | Path, spec: TrainSpec, device: str = "cpu", log=print,
          init: str | Path | None = None) -> Path:
    """Train and save to out_dir; `init` continues from a checkpoint this function wrote."""
    torch.manual_seed(spec.seed)
    cfg = build_config(spec)
    if init is not None:
        model = load_model(init, device, torch.float32).train()
        if model.cfg.vision.num_patches != cfg.vision.num_patches or model.cfg.text.vocab_size != VOCAB_SIZE:
            raise UserError(f"{init} does not have the shapes of this training spec")
        cfg = model.cfg
    else:
        model = LlavaModel(cfg).to(device)
        _init(model)
    tokenizer = build_word_tokenizer(default_words(), IMAGE_TOKEN_ID, VOCAB_SIZE)
    encoder = PromptEncoder(tokenizer, IMAGE_TOKEN_ID, cfg.image_features_per_image)
    processor = ImageProcessor(shortest_edge=spec.image_size, crop_hw=(spec.image_size, spec.image_size))
    data = Batches(encoder, processor, spec.image_size, spec.seed)
    stages = [("align", spec.align_steps, list(model.multi_modal_projector.parameters()), True),
              ("instruct", spec.steps, list(model.parameters()), False)]
    for name, steps, params, captions in stages:
        if steps == 0:
            continue
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
        bar, start, running = Progress(name, steps), time.time(), None
        for step in range(steps):
            ids, labels, pixels = (t.to(device) for t in data.batch(spec.batch_size, captions))
            loss = loss_on(model, ids, labels, pixels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log(f"{name} step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)")
        bar.close()
    out = save_model(model.eval(), out_dir)
    tokenizer.save(str(out / "tokenizer.json"))
    write_preprocessor_config(out, spec.image_size)
    return out


def _init(model: LlavaModel) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
    torch.nn.init.normal_(model.vision_tower.embeddings.class_embedding, std=0.02)
