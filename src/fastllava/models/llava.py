"""LLaVA: encode the image, select and project its features, splice them into the prompt
where the image tokens stand, and run the language model."""

from __future__ import annotations

import torch
from torch import nn

from ..config import LlavaConfig
from ..errors import UserError
from ..kvcache import StaticKVCache
from .language import LanguageModel
from ..quant.kvcache import new_kv_cache
from .projector import Projector
from ..reduction.base import VisionContext
from ..reduction.runtime import Reduction
from .vision import ClsInfo, VisionTower, absolute_layer


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        depth = max(absolute_layer(i, cfg.vision.num_hidden_layers) for i in cfg.vision_feature_layers)
        self.vision_tower = VisionTower(cfg.vision, depth)
        in_dim = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        self.multi_modal_projector = Projector(
            in_dim, cfg.text.hidden_size, cfg.projector_hidden_act, cfg.projector_bias
        )
        self.language_model = LanguageModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.kv_cache = None  # the KV-cache layout (fastllava.quant.KVSpec); None: full precision
        self.weights = None  # the weight quantization applied (fastllava.quant.WeightSpec); None: none

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def vision_features(self, pixel_values: torch.Tensor, cls_info: bool = False):
        """pixel_values [N, C, H, W] -> selected vision features [N, P, Dv * len(layers)]; with
        cls_info also the ClsInfo (class-token attention, keys) of the deepest selected layer,
        restricted to the selected tokens."""
        states = self.vision_tower(pixel_values, self.cfg.vision_feature_layers, cls_info)
        info = None
        if cls_info:
            states, info = states
        if self.cfg.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop the class token
            if info is not None:
                info = ClsInfo(info.attention[:, 1:], info.keys[:, 1:])
        feats = torch.cat(states, dim=-1)
        return (feats, info) if cls_info else feats

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, H, W] -> projected image features [N, P, D]."""
        return self.multi_modal_projector(self.vision_features(pixel_values))

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

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, valid: torch.Tensor,
                positions: torch.Tensor, reduction: Reduction | None = None, image_sizes: torch.Tensor | None = None):
        """Encode the images, splice them into the prompt input_ids [B, T] (real tokens `valid`
        [B, T]) and, with a reduction, call its hook before the language model. `image_sizes`
        is for LLaVA-NeXT (as in transformers' LlavaForConditionalGeneration, unused here).
        -> (embeds [B, T', D], positions [B, T'], valid [B, T'])."""
        method = reduction.method if reduction is not None else None
        want_cls = method is not None and method.where == "vision" and method.needs_cls
        vision, info, feats = None, None, None
        if pixel_values is not None:
            vision = self.vision_features(pixel_values, want_cls)
            if want_cls:
                vision, info = vision
            feats = self.multi_modal_projector(vision)
        x = self.embed(input_ids, feats)
        if reduction is None:
            return x, positions, valid
        is_image = (input_ids == self.cfg.image_token_index) & valid  # [B, T]
        reduction.start(is_image)
        if method.where != "vision" or feats is None:
            return x, positions, valid
        rows = is_image.nonzero()[:, 0].view(feats.shape[0], -1)[:, 0]  # [N] the row of each image
        ctx = VisionContext(
            vision=vision, features=feats, cls_attention=info.attention if info else None,
            keys=info.keys if info else None, text=x[rows], text_valid=(valid & ~is_image)[rows],
            grid=self.cfg.vision.grid, budget=method.keep, project=self.multi_modal_projector,
        )
        return reduction.vision(ctx, x, is_image, valid, positions)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None,
                cache: StaticKVCache | None = None, last_only: bool = False,
                reduction: Reduction | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> logits [B, T, V] (or [B, 1, V] with last_only); with a reduction
        that cuts inside the language model, T is the length after the last cut."""
        pruner = reduction if reduction is not None and reduction.cuts else None
        h = self.language_model(embeds, positions, key_valid, cache, pruner)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        t = self.cfg.text
        return new_kv_cache(self.kv_cache, t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim,
                            self.dtype, self.device)
