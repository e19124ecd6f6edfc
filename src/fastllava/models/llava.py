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
from ..reduction.base import Method, VisionContext
from ..reduction.runtime import Reduction
from .vision import ClsInfo, VisionTower, absolute_layer


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        depth = max(absolute_layer(i, cfg.vision.num_hidden_layers) for i in cfg.vision_feature_layers)
        self.feature_block = depth  # the vision block producing the deepest selected layer
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
        self.decode_mode = "eager"  # how decode steps run: eager, static or compiled (fastllava.fastpath)
        self._compiled = {}  # fastpath's torch.compile'd prefill and decode step, made on first use
        self._compiled_caches = {}  # fastpath's reused caches for compiled decoding, by (batch, slots)
        self.weights = None  # the weight quantization applied (fastllava.quant.WeightSpec); None: none

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

    def encode_pixels(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [N, C, H, W] -> (vision features [N, P, Dv], projected features [N, P, D])."""
        vision = self.vision_features(pixel_values)
        return vision, self.multi_modal_projector(vision)

    def encode_with_cls(self, pixel_values: torch.Tensor,
                        blocks: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """pixel_values [N, C, H, W] -> (vision features [N, P, Dv], projected features [N, P, D],
        then the class-token attention [N, P] and keys [N, P, Dv] of each vision block in `blocks`):
        a flat tuple of tensors, as fastpath's compiled encoder returns it."""
        vision, infos = self.vision_features(pixel_values, blocks)
        return (vision, self.multi_modal_projector(vision), *[t for info in infos for t in (info.attention, info.keys)])

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      method: Method | None = None, early_block: int | None = None) -> dict:
        """pixel_values [N, C, H, W] -> VisionContext's fields about the images: `vision` [N, P, Dv]
        and `features` [N, P, D]; for a method before the LLM that needs them, `cls_attention`,
        `keys` and `early_attention` [N, P] (None otherwise). `image_sizes` is for LLaVA-NeXT.
        `early_block` (1-based, as Method.early_layer) asks for those fields without a method (training)."""
        needs_cls = method is not None and method.where == "vision" and method.needs_cls
        if needs_cls:
            early_block = method.early_layer()
        blocks = ()
        if needs_cls or early_block is not None:
            blocks = (self.feature_block,) + ((early_block,) if early_block is not None else ())
        if blocks:
            vision, features, *flat = self._encoder(self.encode_with_cls)(pixel_values, blocks)
            infos = [ClsInfo(attention, keys) for attention, keys in zip(flat[0::2], flat[1::2])]
        else:
            vision, features = self._encoder(self.encode_pixels)(pixel_values)
            infos = []
        sel, early = (infos + [None, None])[:2]
        return dict(vision=vision, features=features,
                    cls_attention=sel.attention if sel else None, keys=sel.keys if sel else None,
                    early_attention=early.attention if early else None)

    def _encoder(self, fn):
        """fastpath's compiled version of `fn` (encode_pixels or encode_with_cls) in compiled mode, else fn."""
        return self._compiled.get(fn.__name__, fn) if self.decode_mode == "compiled" else fn

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
        [N, 2] is for LLaVA-NeXT (as in transformers' LlavaForConditionalGeneration, unused here).
        -> (embeds [B, T', D], positions [B, T'], valid [B, T'])."""
        method = reduction.method if reduction is not None else None
        images = None if pixel_values is None else self.encode_images(pixel_values, image_sizes, method)
        real = None if images is None else images.get("valid")  # [N, P] on LLaVA-NeXT (rows padded), else None
        feats = None if images is None else images["features"] if real is None else images["features"][real]
        x = self.embed(input_ids, feats)
        if reduction is None:
            return x, positions, valid
        is_image = (input_ids == self.cfg.image_token_index) & valid  # [B, T]
        reduction.start(is_image, None if real is None else real.sum(1))
        if method.where != "vision" or images is None:
            return x, positions, valid
        rows = reduction.rows  # [N] the row of each image
        ctx = VisionContext(**images, text=x[rows], text_valid=(valid & ~is_image)[rows], grid=self.cfg.vision.grid,
                            budget=method.keep, project=self.multi_modal_projector)
        return reduction.vision(ctx, x, is_image, valid, positions)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None,
                cache: StaticKVCache | None = None, last_only: bool = False,
                reduction: Reduction | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> logits [B, T, V] (or [B, 1, V] with last_only); with a reduction
        that cuts inside the language model, T is the length after the last cut."""
        pruner = reduction if reduction is not None and reduction.cuts else None
        bias = reduction.key_bias if reduction is not None else None  # [B, T] merged before the LLM
        h = self.language_model(embeds, positions, key_valid, cache, pruner, bias)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        t = self.cfg.text
        return new_kv_cache(self.kv_cache, t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim,
                            self.dtype, self.device)
