"""Train the embedded default model: a small LLaVA-1.5-architecture model (CLIP-style ViT with a
class token giving a 24 x 24 = 576-token grid, MLP projector, Llama decoder, word tokenizer) on
procedurally generated shapes scenes, then save it as a Hugging Face LLaVA checkpoint.

Two stages as LLaVA does: (1) alignment on scene captions with only the projector trained,
(2) instruction tuning on question/answer pairs of every family with everything trained (the
tower starts from random weights here, so stage 2 trains it too). Stage 1 can be set to zero steps.
Data is generated on the fly from seeds that evaluation sets never use (see TRAIN_SEED_BASE).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fastllava import anyres
from fastllava.assets import EMBEDDED
from fastllava.checkpoint import load_model, save_model
from fastllava.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from fastllava.errors import UserError
from fastllava.evaluation.progress import Progress
from fastllava.evaluation.questions import (ALL_FAMILIES, ASK, ASK_LONG, FAMILIES, STRATEGIES, all_pairs, ask_exist,
                                            left_to_right, prompt)
from fastllava.evaluation.scenes import caption, random_scene, render
from fastllava.evaluation.tokenizer import build_word_tokenizer, default_words, write_preprocessor_config
from fastllava.images import AnyresProcessor, ImageProcessor
from fastllava.models.llava import LlavaModel
from fastllava.models.llava_next import LlavaNextModel
from fastllava.prompts import PromptEncoder

from training.guidance import (WHOLE, Guidance, PatchHead, cls_guide_loss, looked_at, object_attributes, patch_labels,
                               patch_objects, relative_direction, SIDES)

HEADS_FILE = "training_heads.safetensors"  # the training-only heads beside a checkpoint (see heads_path)
HEADS_DIR = Path(__file__).parent / "heads"  # the embedded models' heads, kept out of the installed package
TRAIN_SEED_BASE = 10_000_000  # training streams use seeds >= this; evaluation sets use small seeds
IMAGE_TOKEN_ID = 3
EOS_ID = 2
VOCAB_SIZE = 128
CAPTION_PROMPT = "Describe the image."
NEXT_CANVASES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # LLaVA-NeXT's image_grid_pinpoints, in tiles


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
    vision_steps: int = 0  # vision tower alone on dense patch labels, before the other stages
    head_steps: int = 0  # training-only heads alone (model frozen) before instruction tuning: for a
    # continued run whose heads start afresh, so that their first, large gradients do not disturb the model
    align_steps: int = 200
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    aux_weight: float = 0.5  # weight of the patch-label loss during instruction tuning
    guide_weight: float = 0.5  # weight of the attention-guidance and object-probe losses (training.guidance)
    guide_layer: int = 1  # the first of the two language-model layers guided (training.guidance.Guidance)
    cls_weight: float = 0.0  # weight of the class-token attention loss (training.guidance.cls_guide_loss), in
    # the selected vision layer and in block cls_early_block (the early layer HiRED reads)
    cls_early_block: int = 1
    questions: int = 8  # question/answer segments sharing one image per training row
    minutes: float = 0.0  # wall-clock budget per stage; the schedule follows whichever ends first (0 = off)
    save_every: int = 200  # steps between intermediate checkpoints (0 = only at the end)
    workers: int = 0  # processes generating batches ahead of the training step (0 = in the step)
    anyres: bool = False  # a LLaVA-NeXT model (tiles at NEXT_CANVASES) on the hires scenes variant
    families: str = ",".join(FAMILIES)  # the question families asked (comma-separated; `describe` too)
    drop_background: float = 0.0  # fraction of rows whose language model sees only part of the image's
    # background: a random share (uniform in [0, 1]) of the visual tokens showing no object is hidden
    # from every later token, so that answers come from the objects' tokens, as after a reduction that
    # keeps them (without it the model leans on background tokens and fails when they are gone)
    render_sizes: str = ""  # pixels per tile the scenes are rendered at, one drawn per batch (comma-
    # separated, e.g. "96,336": the processor downscales larger renders as it does at inference; "" = image_size)
    seed: int = 0

    def family_list(self) -> tuple[str, ...]:
        names = tuple(f.strip() for f in self.families.split(",") if f.strip())
        unknown = [f for f in names if f not in ALL_FAMILIES]
        if unknown or not names:
            raise UserError(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_FAMILIES)}")
        return names

    def render_size_list(self) -> tuple[int, ...]:
        try:
            sizes = tuple(int(v) for v in self.render_sizes.split(",") if v.strip()) or (self.image_size,)
        except ValueError:
            raise UserError(f"--render-sizes must be comma-separated pixel counts, not {self.render_sizes!r}") from None
        if min(sizes) < self.image_size:
            raise UserError(f"--render-sizes must be >= the model's image size {self.image_size}")
        return sizes


def build_config(spec: TrainSpec) -> LlavaConfig:
    vision = VisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                          num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                          image_size=spec.image_size, patch_size=spec.patch_size)
    text = TextConfig(vocab_size=VOCAB_SIZE, hidden_size=spec.text_hidden, intermediate_size=3 * spec.text_hidden,
                      num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                      num_key_value_heads=spec.text_kv_heads, head_dim=spec.text_hidden // spec.text_heads,
                      max_position_embeddings=4096 if spec.anyres else 1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=[2],
                      pad_token_id=0, rope=RopeConfig())
    pinpoints = [(h * spec.image_size, w * spec.image_size) for h, w in NEXT_CANVASES] if spec.anyres else None
    return LlavaConfig(vision=vision, text=text, image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_layers=[-1], vision_feature_select_strategy="default",
                       image_grid_pinpoints=pinpoints)


def training_processor(cfg: LlavaConfig) -> ImageProcessor | AnyresProcessor:
    """The preprocessing the saved checkpoint declares (write_preprocessor_config), for a model of `cfg`."""
    tile = cfg.vision.image_size
    pieces = ImageProcessor(shortest_edge=tile, crop_hw=(tile, tile))
    return AnyresProcessor(pieces, cfg.image_grid_pinpoints, tile, (tile, tile)) if cfg.is_next else pieces


class Batches:
    """Endless stream of packed training rows.

    Instruction rows hold one image and `questions` question/answer segments that share it: the
    prefix (`<s> USER: <image>...`) is followed by every segment (`question ASSISTANT: answer </s>`),
    each segment attends to the prefix and to itself only and its positions continue from the
    prefix, so each one sees exactly what a single-question prompt sees at inference, while the
    image is encoded once for all of them. Caption rows (alignment) hold one segment.
    A batch is a `Packed`: input_ids [B, T], positions [B, T], segments [B, T], targets [B, T],
    pixels...; `segments` is 0 on the prefix, i on segment i and -1 on padding; `targets` holds the
    next token of the same segment where it is an answer token or EOS, else -100.
    With an AnyresProcessor (LLaVA-NeXT) the scenes are of `variant` (e.g. hires), the images of
    one batch share a canvas (so that their visual tokens line up), and the per-token labels and
    masks follow the language model's token order (base thumbnail, tiles' rows, newlines).
    """

    def __init__(self, encoder: PromptEncoder, processor: ImageProcessor | AnyresProcessor, image_size: int,
                 seed: int, questions: int = 1, grid: int = 24, variant: str = "default",
                 families: tuple[str, ...] = FAMILIES, render_sizes: tuple[int, ...] = (),
                 drop_background: float = 0.0):
        self.drop_background = drop_background  # see TrainSpec.drop_background
        self.encoder, self.processor, self.image_size, self.grid = encoder, processor, image_size, grid
        self.questions, self.variant, self.families = questions, variant, tuple(families)
        self.render_sizes = tuple(render_sizes) or (image_size,)  # one drawn per batch
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(TRAIN_SEED_BASE + seed))
        self.popular = all_pairs()  # frequency order is learned from data; any order trains all pairs
        # sampling weights (see `reweight`), in shared memory so that worker processes see updates
        self.family_weights = torch.ones(len(self.families), dtype=torch.float64).share_memory_()
        self.side_ids = [encoder.tokenizer.token_to_id(w) for w in SIDES]  # the words of training.guidance.SIDES
        self.article_id = encoder.tokenizer.token_to_id("a")  # starts each object of a describe answer

    def reweight(self, family_losses: dict[str, float]) -> None:
        """Ask more often from the families the model still gets wrong (weights ~ loss + floor)."""
        self.family_weights.copy_(torch.tensor([family_losses.get(f, 1.0) + 0.05 for f in self.families]))

    def stream(self, size: int, captions: bool, workers: int, stage: int = 0):
        """Endless batches of `size` rows: made here (workers=0) or by `workers` processes ahead
        of the caller, each drawing from its own seed stream (this one's seed, stage, worker)."""
        if workers == 0:
            while True:
                yield self.batch(size, captions)
        loader = torch.utils.data.DataLoader(_Stream(self, size, captions, stage), batch_size=None,
                                             num_workers=workers, prefetch_factor=4, collate_fn=_same)
        yield from loader

    def _question(self, scene) -> tuple[str, str, str] | None:
        weights = self.family_weights.numpy().copy()  # a snapshot: the trainer may be writing it
        p = weights / weights.sum()
        family = self.families[int(self.rng.choice(len(self.families), p=p))]
        if family in ASK_LONG:
            q = ASK_LONG[family](scene, self.rng)
        elif family == "exist":
            q = ask_exist(scene, self.rng, ("yes", "no")[int(self.rng.integers(2))],
                          STRATEGIES[int(self.rng.integers(len(STRATEGIES)))], self.popular)
        else:
            q = ASK[family](scene, self.rng)
        return None if q is None else (prompt(q.question, family), q.answer, family)

    def layout(self, size: tuple[int, int]) -> tuple[list, list[int]]:
        """An image of `size` (height, width) -> (the boxes of the pieces the processor cuts, as
        anyres.piece_boxes; for each visual token of the language model, the index of its patch
        among the pieces' patches, -1 for a newline (anyres.token_sources))."""
        if not isinstance(self.processor, AnyresProcessor):
            return WHOLE, list(range(self.grid * self.grid))
        p = self.processor
        grid = anyres.tile_grid(size, p.pinpoints, p.tile)
        return anyres.piece_boxes(size, p.pinpoints, p.tile), anyres.token_sources(size, grid, self.grid)[0]

    def example(self, captions: bool, canvas: tuple[int, int] | None = None, size: int | None = None):
        """(prefix ids, [(segment ids, segment targets, family, guides)], image, labels of the visual
        tokens [P, 6] (-100 on newlines)), the image rendered at `size` pixels per tile (default
        image_size) on `canvas` (tiles) if given. Each of a segment's guides is (the index in the
        segment of a position to guide, visual tokens looked at [3, P] bool, attributes [3, A] of
        the one object looked at or -100s, relative direction (2 ints), asked side (index in the
        segment or -1, SIDES class or -100)); the 3 are training.guidance.looked_at's first, second
        and answer objects. A one-word question has one guide, at the position predicting its
        answer; a describe answer one per object, at the article that starts the object's words
        (it predicts the size word): first and second are the object just listed (named by the
        words before; none for the first object), answer the object to list now, the next one to
        the right — the two hops of a relation question; a caption none."""
        size = size or self.image_size
        qas = []
        while not qas:  # a scene may allow no question of the families drawn: take another
            scene = random_scene(self.rng, self.variant, canvas)
            if captions:
                qas = [(CAPTION_PROMPT, caption(scene), "caption")]
            tries = 0
            while not captions and len(qas) < self.questions and tries < 20 * self.questions:
                tries += 1
                qa = self._question(scene)
                if qa is not None and all(qa[0] != q for q, _, _ in qas):
                    qas.append(qa)
        prefix, segments = None, []
        image = render(scene, size)
        boxes, src = self.layout((image.height, image.width))
        src = np.asarray(src)  # [P]
        newline = torch.from_numpy(src < 0)  # [P]
        at = patch_objects(scene, self.grid, size, boxes)  # [K * g * g] over the pieces' patches
        objects = np.where(src < 0, 0, at[src.clip(min=0)])  # [P]
        labels = patch_labels(scene, self.grid, size, boxes, at)[src.clip(min=0)]  # [P, 6]
        labels = labels.masked_fill(newline[:, None], -100)

        def guide(offset: int, roles, side=(-1, -100)):
            masks = torch.from_numpy(np.stack([np.isin(objects, [i + 1 for i in r]) for r in roles]))  # [3, P]
            attrs = torch.tensor([object_attributes(scene, r) for r in roles])  # [3, A]
            return offset, masks, attrs, relative_direction(scene, roles[0], roles[1]), side

        for question, answer, family in qas:
            ids = self.encoder.prompt_ids(question, image_tokens=[len(src)])
            cut = len(ids) - ids[::-1].index(IMAGE_TOKEN_ID)  # the prefix ends after the last image token
            prefix = ids[:cut]
            answer_ids = self.encoder.tokenizer.encode(answer, add_special_tokens=False).ids + [EOS_ID]
            seg = ids[cut:] + answer_ids
            begins = len(seg) - len(answer_ids)  # the answer's first token
            targets = [-100] * (begins - 1) + answer_ids + [-100]  # next-token targets
            guides = []
            if family in ASK_LONG:  # describe: the objects in the order its answer lists them
                order = left_to_right(scene)
                articles = [k for k in range(begins, len(seg)) if seg[k] == self.article_id]
                before = [set()] + [{i} for i in order[:-1]]  # the object listed before each, if any
                guides = [guide(k, (b, b, {i})) for k, b, i in zip(articles, before, order)]
            elif family != "caption":
                roles = looked_at(scene, question)
                asked = [(k, self.side_ids.index(t)) for k, t in enumerate(seg[:begins]) if t in self.side_ids]
                first = guide(begins - 1, roles, asked[0] if asked else (-1, -100))  # side: the one a
                # position question asks about, if it names one
                guides = [first] if first[1][0].any() else []
            segments.append((seg, targets, family, guides))
        return prefix, segments, image, labels

    def batch(self, size: int, captions: bool = False) -> "Packed":
        render_size = self.render_sizes[int(self.rng.integers(len(self.render_sizes)))]
        first = self.example(captions, size=render_size)
        canvas = (first[2].height // render_size, first[2].width // render_size)
        rows = [first] + [self.example(captions, canvas, render_size) for _ in range(size - 1)]
        lengths = [len(p) + sum(len(s[0]) for s in segs) for p, segs, _, _ in rows]
        longest = max(lengths)
        ids = torch.zeros(size, longest, dtype=torch.long)
        positions = torch.zeros(size, longest, dtype=torch.long)
        segments = torch.full((size, longest), -1, dtype=torch.long)
        targets = torch.full((size, longest), -100, dtype=torch.long)
        families = []  # the family of every target in row-major order; None for EOS targets
        guide_at, guide_mask, guide_attrs, guide_dirs, guide_side = [], [], [], [], []  # per guided position:
        # (row, position), patches, objects, direction, asked side
        for i, (prefix, segs, _, _) in enumerate(rows):
            n = len(prefix)
            ids[i, :n], positions[i, :n], segments[i, :n] = torch.tensor(prefix), torch.arange(n), 0
            at = n
            for j, (seg, tgt, family, guides) in enumerate(segs, start=1):
                span = slice(at, at + len(seg))
                for offset, named, attrs, dirs, side in guides:
                    guide_at.append((i, at + offset))
                    guide_mask.append(named)
                    guide_attrs.append(attrs)
                    guide_dirs.append(dirs)
                    guide_side.append((side[0] + at if side[0] >= 0 else -1, side[1]))
                ids[i, span], targets[i, span] = torch.tensor(seg), torch.tensor(tgt)
                positions[i, span], segments[i, span] = torch.arange(n, n + len(seg)), j
                families += [None if t == EOS_ID else family for t in tgt if t != -100]
                at += len(seg)
        if isinstance(self.processor, AnyresProcessor):
            pixels, sizes = self.processor([r[2] for r in rows])
        else:
            pixels, sizes = self.processor([r[2] for r in rows]), None
        p = len(rows[0][3])  # visual tokens per row
        start = len(rows[0][0]) - p
        hidden = torch.zeros(size, longest, dtype=torch.bool)  # [B, T] keys no later token sees
        for i, row in enumerate(rows):
            if self.drop_background > 0 and self.rng.random() < self.drop_background:
                background = (row[3][:, 0] == 0).numpy()  # [P] patches on no object (newlines: -100)
                hidden[i, start:start + p] = torch.from_numpy(background & (self.rng.random(p) < self.rng.random()))
        return Packed(ids, positions, segments, targets, pixels, torch.stack([r[3] for r in rows]), families,
                      torch.tensor(guide_at, dtype=torch.long).view(-1, 2),
                      torch.stack(guide_mask) if guide_mask else torch.zeros(0, 3, p, dtype=torch.bool),
                      torch.stack(guide_attrs) if guide_attrs else torch.zeros(0, 3, 4, dtype=torch.long),
                      torch.tensor(guide_dirs, dtype=torch.long).view(-1, 2),
                      torch.tensor(guide_side, dtype=torch.long).view(-1, 2),
                      start, sizes, hidden if bool(hidden.any()) else None)


class _Stream(torch.utils.data.IterableDataset):
    """Batches.stream's source in a worker process: the parent's Batches with its own generator."""

    def __init__(self, data: Batches, size: int, captions: bool, stage: int):
        self.data, self.size, self.captions, self.stage = data, size, captions, stage

    def __iter__(self):
        torch.set_num_threads(1)
        worker = torch.utils.data.get_worker_info().id
        self.data.rng = np.random.Generator(np.random.PCG64([TRAIN_SEED_BASE + self.data.seed, self.stage, worker]))
        while True:
            yield self.data.batch(self.size, self.captions)


def _same(batch):
    return batch


@dataclass
class Packed:
    """One packed batch (see Batches): tensors [B, T] and pixels [B, 3, H, W], per-patch labels
    [B, P, 4] for the auxiliary head, the family of each target (None for EOS), and for attention
    guidance the (row, position) of N answer-predicting positions [N, 2], the patches of the
    objects their questions look at [N, 3, P] and those objects' attributes [N, 3, A] (-100: not
    one object) for training.guidance.looked_at's (first, second, answer), where the first is relative
    to the second [N, 2] (training.guidance.relative_direction), the (position in the row, class) of
    the side word a position question asks about [N, 2] ((-1, -100) where none; training.guidance.SIDES),
    where the P image tokens start in every row, and for LLaVA-NeXT the image_sizes [B, 2]
    (pixels [B, K, 3, H, W] then hold each image's K pieces)."""

    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor
    pixels: torch.Tensor
    patch_labels: torch.Tensor
    families: list
    guide_at: torch.Tensor
    guide_mask: torch.Tensor
    guide_attrs: torch.Tensor
    guide_dirs: torch.Tensor
    guide_side: torch.Tensor
    image_start: int
    image_sizes: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, T] bool: visual tokens hidden from the others (drop_background)

    def to(self, device) -> "Packed":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Packed(**moved)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [B, T] -> boolean attention mask [B, 1, T, T]: causal, and a segment sees the
    prefix (segment 0) and itself only; padding (-1) sees only padding."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()  # [T, T]
    q, k = segments[:, :, None], segments[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal & (((k == 0) & (q >= 0)) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def packed_logits(model: LlavaModel, batch: Packed, taps: tuple[int, ...] = (), early_block: int | None = None):
    """(logits [B, T, V] of a packed batch, the images' encoding (LlavaModel.encode_images: `vision`
    [B, P, Dv] the features LLaVA reads in the language model's order; with `early_block` also the
    class-token attention of the selected layer and of that block), and for each layer in `taps`
    the attention probabilities of the N guided queries (batch.guide_at) [N, H, T] and the hidden
    states after it [B, T, D]: {layer: (probs, hidden)})."""
    lm = model.language_model
    blocks = model.cls_blocks(early_block) if early_block is not None else ()
    images = model.encode_images(batch.pixels, batch.image_sizes, blocks)
    x = model.embed(batch.ids, images["features"])  # [B, T, D]
    cos, sin = lm.rotary(batch.positions, x.dtype)
    mask, t = segment_mask(batch.segments), x.shape[1]
    if batch.hidden is not None:  # hidden tokens are keys of no query (they still attend, unseen)
        mask = mask & ~batch.hidden[:, None, None, :]
    tapped, first = {}, 0
    for tap in sorted(taps):  # the layers up to each tapped one, in one call of the layer loop
        x, probs, _ = lm.run(x, cos, sin, mask, None, 0, t, range(first, tap + 1), batch.guide_at.unbind(-1))
        tapped[tap], first = (probs, x), tap + 1
    x = lm.run(x, cos, sin, mask, None, 0, t, range(first, len(lm.layers)))[0]
    return model.head(x), images, tapped


def loss_on(model: LlavaModel, head: PatchHead | None, batch: Packed, aux_weight: float = 0.0,
            guide_weight: float = 0.0, guidance: Guidance | None = None, cls_weight: float = 0.0,
            cls_early_block: int = 1):
    """(loss, per-target answer losses [N] in target order, auxiliary vision losses (patch labels +
    class-token attention), guidance loss):
    the mean answer cross-entropy plus `aux_weight` times the patch-label loss of `head` plus
    `guide_weight` times the loss of `guidance` (where to look, what to read there) plus
    `cls_weight` times the class-token attention loss (in the selected layer and block
    `cls_early_block`)."""
    guided = guidance is not None and guide_weight > 0 and len(batch.guide_at) > 0
    logits, images, taps = packed_logits(model, batch, guidance.layers if guided else (),
                                         cls_early_block if cls_weight > 0 else None)
    states = images["vision"]  # [B, P, Dv]
    picked = batch.targets != -100  # [B, T]
    per = F.cross_entropy(logits[picked].float(), batch.targets[picked], reduction="none")  # [N]
    zero = torch.zeros((), device=per.device)
    aux = head.loss(states, batch.patch_labels) if head is not None else zero
    cls = zero
    if cls_weight > 0:
        objects, part = batch.patch_labels[..., 0] > 0, images.get("part")  # [B, P] each
        cls = (cls_guide_loss(images["cls_attention"], objects, part)
               + cls_guide_loss(images["early_attention"], objects, part))
    guide = zero
    if guided:
        image = slice(batch.image_start, batch.image_start + batch.guide_mask.shape[-1])
        guide = guidance.loss(taps, batch.guide_at.unbind(-1), image, batch.guide_mask, batch.guide_attrs,
                              batch.guide_dirs, batch.guide_side)
    loss = per.mean() + aux_weight * aux + guide_weight * guide + cls_weight * cls
    return loss, per.detach(), (aux + cls).detach(), guide.detach()


def train(out_dir: str | Path, spec: TrainSpec, device: str = "cpu", log=print,
          init: str | Path | None = None) -> Path:
    """Train and save to out_dir (also every `spec.save_every` steps, so a long run can be
    evaluated or resumed while it goes); `init` continues from a checkpoint this function wrote.

    Stages: `vision_steps` of the vision tower alone on the dense patch labels (training.guidance),
    `align_steps` of the projector on captions, `steps` of everything on questions (with the
    patch labels as an auxiliary loss weighted by `aux_weight`)."""
    if not 0.0 <= spec.drop_background <= 1.0:
        raise UserError(f"--drop-background must be a fraction in [0, 1], not {spec.drop_background}")
    torch.manual_seed(spec.seed)
    cfg = build_config(spec)
    if init is not None:
        model = load_model(init, device, torch.float32).train()
        if model.cfg.vision.num_patches != cfg.vision.num_patches or model.cfg.text.vocab_size != VOCAB_SIZE:
            raise UserError(f"{init} does not have the shapes of this training spec")
        if spec.anyres and not model.cfg.is_next:
            model = _as_next(model, cfg)
            log(f"LLaVA-NeXT model from {init}'s weights, image_newline from random")
        elif model.cfg.is_next != spec.anyres:
            raise UserError(f"{init} is a LLaVA-NeXT checkpoint; pass --anyres to continue it")
        cfg = model.cfg
    else:
        model = (LlavaNextModel if cfg.is_next else LlavaModel)(cfg).to(device)
        _init(model)
    head = PatchHead(cfg.vision.hidden_size * len(cfg.vision_feature_layers)).to(device)
    if spec.guide_weight > 0 and not 0 <= spec.guide_layer < cfg.text.num_hidden_layers - 1:
        raise UserError(f"--guide-layer must be in [0, {cfg.text.num_hidden_layers - 2}] (two layers are guided)")
    guidance = Guidance(cfg.text.hidden_size, spec.guide_layer).to(device)
    heads = {"patch": head, "guidance": guidance}  # training-only modules, saved to heads_path(out_dir)
    if init is not None:
        _load_heads(heads, Path(init), log)
    tokenizer = build_word_tokenizer(default_words(), IMAGE_TOKEN_ID, VOCAB_SIZE)
    encoder = PromptEncoder(tokenizer, IMAGE_TOKEN_ID, cfg.image_features_per_image)
    data = Batches(encoder, training_processor(cfg), spec.image_size, spec.seed, spec.questions, cfg.vision.grid,
                   "hires" if spec.anyres else "default", spec.family_list(), spec.render_size_list(),
                   spec.drop_background)
    vision = [*model.vision_tower.parameters(), *head.parameters()]
    stages = [("vision", spec.vision_steps, vision, False),
              ("align", spec.align_steps, list(model.multi_modal_projector.parameters()), True),
              ("heads", spec.head_steps, [*head.parameters(), *guidance.parameters()], False),
              ("instruct", spec.steps, [*model.parameters(), *head.parameters(), *guidance.parameters()], False)]
    for stage, (name, steps, params, captions) in enumerate(stages):
        if steps == 0:
            continue
        model.requires_grad_(name != "heads")
        batches = data.stream(spec.batch_size, captions, spec.workers, stage)
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        bar, start, running, aux_ema, guide_ema = Progress(name, steps), time.time(), None, None, None
        family_loss: dict[str, float] = {}
        for step in range(steps):
            done = max(step / steps, (time.time() - start) / (60 * spec.minutes) if spec.minutes else 0.0)
            if done >= 1.0:
                log(f"{name}: time budget of {spec.minutes} min reached after {step} steps")
                break
            for group in opt.param_groups:
                group["lr"] = spec.lr * _lr_factor(done, step)
            batch = next(batches).to(device)
            if name == "vision":
                aux = head.loss(model.encode_images(batch.pixels, batch.image_sizes)["vision"], batch.patch_labels)
                loss, per, guide = aux, None, torch.zeros(())
            else:
                tuning = name in ("heads", "instruct")  # the question stages, with every auxiliary loss
                loss, per, aux, guide = loss_on(model, head if tuning else None, batch,
                                                spec.aux_weight if tuning else 0.0,
                                                spec.guide_weight if tuning else 0.0, guidance,
                                                spec.cls_weight if tuning else 0.0, spec.cls_early_block)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            aux_ema = aux.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux.item()
            guide_ema = guide.item() if guide_ema is None else 0.98 * guide_ema + 0.02 * guide.item()
            if per is not None:
                _update_family_losses(family_loss, batch.families, per.cpu())
            if name == "instruct":
                data.reweight(family_loss)
            bar.update(1)
            if (step + 1) % 50 == 0 or step + 1 == steps:
                fams = " ".join(f"{f}={v:.3f}" for f, v in sorted(family_loss.items()))
                log(f"{name} step {step + 1}/{steps} loss {running:.4f} patch {aux_ema:.4f} guide {guide_ema:.3f} [{fams}] "
                    f"({time.time() - start:.0f} s)")
            if spec.save_every and (step + 1) % spec.save_every == 0 and step + 1 < steps:
                _save(model, tokenizer, out_dir, spec.image_size, heads)
        bar.close()
    return _save(model, tokenizer, out_dir, spec.image_size, heads)


def _as_next(model: LlavaModel, spec_cfg: LlavaConfig) -> LlavaNextModel:
    """A LLaVA-1.5 model's weights in a LLaVA-NeXT model (as LLaVA-NeXT starts from LLaVA-1.5's
    recipe): the same tower, projector and language model, a fresh image_newline, and the tiling
    and context of the NeXT spec's config `spec_cfg` (build_config: a hires image alone gives up to
    2928 visual tokens)."""
    text = dataclasses.replace(model.cfg.text, max_position_embeddings=spec_cfg.text.max_position_embeddings)
    cfg = dataclasses.replace(model.cfg, image_grid_pinpoints=spec_cfg.image_grid_pinpoints, text=text)
    out = LlavaNextModel(cfg).to(model.device)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["image_newline"] and not unexpected, (missing, unexpected)
    torch.nn.init.normal_(out.image_newline, std=0.02)
    return out.train()


def heads_path(checkpoint_dir: str | Path) -> Path:
    """Where the training-only heads (patch head, guidance probes) of a checkpoint live: for the
    embedded models (fastllava.assets.EMBEDDED, which the package ships without them)
    training/heads/<directory name>.safetensors, e.g. training/heads/default_model.safetensors;
    for any other checkpoint HEADS_FILE beside it. `train` reads them from and writes them to here."""
    path = Path(checkpoint_dir).expanduser().resolve()
    for embedded in EMBEDDED.values():
        if path == embedded.resolve():
            return HEADS_DIR / f"{embedded.name}.safetensors"
    return path / HEADS_FILE


def _load_heads(heads: dict, init: Path, log) -> None:
    """Continue the training-only heads from `init`'s heads_path where it has one (else they
    start afresh, and their first steps disturb the model); parameters the file lacks (a probe
    added since) start afresh."""
    path = heads_path(init)
    if not path.is_file():
        log(f"no {path} for {init}: the training heads start from random weights")
        return
    saved = load_file(str(path))
    for name, module in heads.items():
        own = module.state_dict()
        found = {k: saved[f"{name}.{k}"] for k in own if f"{name}.{k}" in saved
                 and saved[f"{name}.{k}"].shape == own[k].shape}
        module.load_state_dict(found, strict=False)
        if len(found) < len(own):
            log(f"{name} head: {len(own) - len(found)} of {len(own)} tensors start from random weights")


def _lr_factor(done: float, step: int, warmup_steps: int = 50) -> float:
    """Linear warm-up over the first steps, then cosine decay to 5% of the peak as the run's
    progress `done` (fraction of its steps or of its time budget, whichever is larger) goes to 1."""
    return min(1.0, (step + 1) / warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def _update_family_losses(ema: dict[str, float], families: list[str | None], per: torch.Tensor) -> None:
    """Exponential moving average of the mean answer-token loss (EOS left out) of each family."""
    sums: dict[str, list[float]] = {}
    for family, value in zip(families, per.tolist()):
        if family is not None:
            sums.setdefault(family, []).append(value)
    for family, values in sums.items():
        mean = sum(values) / len(values)
        ema[family] = mean if family not in ema else 0.9 * ema[family] + 0.1 * mean


def _save(model: LlavaModel, tokenizer, out_dir: str | Path, image_size: int, heads: dict) -> Path:
    was_training = model.training
    out = save_model(model.eval(), out_dir)
    model.train(was_training)
    save_file({f"{name}.{k}": v.detach().contiguous().cpu() for name, m in heads.items()
               for k, v in m.state_dict().items()}, str(heads_path(out)))
    tokenizer.save(str(out / "tokenizer.json"))
    write_preprocessor_config(out, image_size, model.cfg.image_grid_pinpoints)
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
    if isinstance(model, LlavaNextModel):
        torch.nn.init.normal_(model.image_newline, std=0.02)
