"""LLaVA: a vision tower, a projector and a language model. `encode_images` turns pixels into
projected features, `embed` writes them into the prompt where the image tokens stand, the
language model's `run` is the layer loop, `head` gives the logits. The model holds weights and
config only: caches, decode modes and compiled functions live in fastllava.generation."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import LlavaConfig
from ..errors import UserError
from ..ops import attention_mask
from .language import LanguageModel
from .projector import Projector
from .siglip import SiglipTower
from .vision import ClsInfo, TowerPlan, VisionTower, absolute_layer

# (pixel_values [N, C, H, W], vision blocks) -> (vision [N, P, Dv], features [N, P, D], then the
# class-token attention [N, P] and keys [N, P, Dv] of each block): LlavaModel.encode_tower, or a
# compiled version of it.
Tower = Callable[[torch.Tensor, tuple], tuple]


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        depth = max(absolute_layer(i, cfg.vision.num_hidden_layers) for i in cfg.vision_feature_layers)
        self.feature_block = depth  # the vision block producing the deepest selected layer
        self.vision_tower = (VisionTower if cfg.vision.class_token else SiglipTower)(cfg.vision, depth)
        in_dim = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        self.multi_modal_projector = Projector(
            in_dim, cfg.text.hidden_size, cfg.projector_hidden_act, cfg.projector_bias
        )
        self.language_model = LanguageModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def vision_features(self, pixel_values: torch.Tensor, cls_blocks: tuple[int, ...] = ()):
        """pixel_values [N, C, H, W] -> selected vision features [N, P, Dv * len(layers)]; with
        cls_blocks also the ClsInfo (class-token attention, keys) of each of those vision blocks,
        restricted to the selected tokens."""
        states = self.vision_tower(pixel_values, self.cfg.vision_feature_layers, cls_blocks)
        infos = []
        if cls_blocks:
            states, infos = states
        if self.cfg.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop the class token
            infos = [ClsInfo(i.attention[:, 1:], i.keys[:, 1:]) if i is not None else None for i in infos]
        feats = torch.cat(states, dim=-1)
        return (feats, infos) if cls_blocks else feats

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, H, W] -> projected image features [N, P, D]."""
        return self.multi_modal_projector(self.vision_features(pixel_values))

    def encode_tower(self, pixel_values: torch.Tensor, blocks: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
        """pixel_values [N, C, H, W] -> (vision features [N, P, Dv], projected features [N, P, D],
        then the class-token attention [N, P] and keys [N, P, Dv] of each vision block in `blocks`):
        a flat tuple of tensors, so that a compiled version returns the same."""
        if not blocks:
            vision = self.vision_features(pixel_values)
            return vision, self.multi_modal_projector(vision)
        vision, infos = self.vision_features(pixel_values, blocks)
        return (vision, self.multi_modal_projector(vision), *[t for info in infos for t in (info.attention, info.keys)])

    def cls_blocks(self, early_block: int | None) -> tuple[int, ...]:
        """The vision blocks whose class-token attention a reader of `early_block` (1-based, or
        None: the selected layer only) needs: the selected features' block, then that one."""
        return (self.feature_block,) + ((early_block,) if early_block is not None else ())

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      blocks: tuple[int, ...] = (), tower: Tower | None = None) -> dict:
        """pixel_values [N, C, H, W] -> the images' fields of a reduction's VisionContext: `vision`
        [N, P, Dv] and `features` [N, P, D]; with `blocks` (see cls_blocks) also `cls_attention`,
        `keys` (of the first block) and `early_attention` (of the second) [N, P], else None.
        `image_sizes` is for LLaVA-NeXT. `tower` replaces encode_tower (a compiled version).
        With a TowerPlan as `blocks` (a method that reduces inside the tower, see
        reduction.base.TowerMethod) see encode_planned (`tower` is not used)."""
        if blocks and not isinstance(blocks[0], int):
            return self.encode_planned(pixel_values, blocks[0])
        vision, features, *flat = (tower or self.encode_tower)(pixel_values, blocks)
        infos = [ClsInfo(attention, keys) for attention, keys in zip(flat[0::2], flat[1::2])]
        sel, early = (infos + [None, None])[:2]
        return dict(vision=vision, features=features,
                    cls_attention=sel.attention if sel else None, keys=sel.keys if sel else None,
                    early_attention=early.attention if early else None)

    def encode_planned(self, pixel_values: torch.Tensor, plan: TowerPlan) -> dict:
        """pixel_values [N, C, H, W] through the tower under `plan` -> encode_images' fields with the
        tokens the plan left written at their places among the P patches (zeros elsewhere; only those
        are projected), and `tower_keep` [N, P] (the tokens left), `tower_groups` [N, P] long (the
        patch each patch now belongs to: itself, the kept one it was merged into, -1 dropped) and
        `tower_sizes` [N, P] float (patches each kept one stands for). Strategy "default" only."""
        if self.cfg.vision_feature_select_strategy != "default" or not self.cfg.vision.class_token:
            raise UserError("reduction inside the vision tower needs a CLIP tower and the 'default' feature selection")
        selected, tokens = self.vision_tower(pixel_values, self.cfg.vision_feature_layers, plan=plan)
        feats = torch.cat(selected, dim=-1)  # [N, T', Dv]
        n, p = feats.shape[0], self.cfg.vision.num_patches
        place = tokens.index - 1  # [N, T'] place among the patches (-1: the class token)
        real = tokens.alive & (place >= 0)
        rows = real.nonzero(as_tuple=True)[0]
        cols = place[real]
        projected = self.multi_modal_projector(feats[real])  # [K, D] the kept tokens only
        vision = feats.new_zeros(n, p, feats.shape[-1])
        vision[rows, cols] = feats[real]
        features = projected.new_zeros(n, p, projected.shape[-1])
        features[rows, cols] = projected
        keep = torch.zeros(n, p, dtype=torch.bool, device=feats.device)
        keep[rows, cols] = True
        sizes = torch.ones(n, p, device=feats.device)
        sizes[rows, cols] = tokens.sizes[real].float()
        owner = tokens.owner[:, 1:]  # [N, P] current place of each patch's owner
        final = place.gather(1, owner.clamp(min=0))  # [N, P] that owner's patch
        groups = final.masked_fill(owner < 0, -1)
        return dict(vision=vision, features=features, cls_attention=None, keys=None, early_attention=None,
                    tower_keep=keep, tower_groups=groups, tower_sizes=sizes)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features ([N, P, D], or [F, D] one image after
        another) written at the image-token positions, images taken in order of appearance (row by row)."""
        is_image = input_ids == self.cfg.image_token_index  # [B, T]
        ids = input_ids.masked_fill(is_image, 0)
        x = self.language_model.embed_tokens(ids)
        n_slots = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.numel() // image_features.shape[-1]
        if n_slots != n_feats:
            raise UserError(
                f"the prompt holds {n_slots} image tokens but the images give {n_feats} features"
            )
        if n_slots:
            x = x.masked_scatter(is_image[..., None], image_features.reshape(-1, x.shape[-1]).to(x.dtype))
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, D] -> logits [B, T, V]."""
        return self.lm_head(self.language_model.norm(h))

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, T, D] at positions [B, T], real tokens key_valid [B, T] (None: all) -> logits
        [B, T, V], without a cache or a reduction (fastllava.generation.prefill has both)."""
        lm, t = self.language_model, embeds.shape[1]
        window = self.cfg.text.sliding_window
        mask = None
        if key_valid is not None or (window is not None and t > window):
            mask = attention_mask(key_valid, 0, t, t, window if window is not None and t > window else None,
                                  device=embeds.device)
        cos, sin = lm.rotary(positions, embeds.dtype)
        return self.head(lm.run(embeds, cos, sin, mask, None, 0, t, range(len(lm.layers)))[0])
