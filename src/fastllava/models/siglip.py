"""SigLIP vision transformer, as LLaVA-OneVision uses it: no class token, the patch embedding
has a bias, learned position embeddings (one per patch), no layernorm before the blocks. The
blocks are CLIP's (pre-LN, `gelu_pytorch_tanh` MLP). SigLIP's post-layernorm and attention-pooling
head are never applied: transformers' LLaVA-OneVision reads the hidden states, which are the
blocks' outputs without them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import UserError
from .vision import VisionBlock, absolute_layer


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=True)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, H, W] (H = W = image_size) -> [N, g*g, D]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, g, g]
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight[None]


class SiglipTower(nn.Module):
    """Returns the hidden states that feature selection asks for, as transformers numbers them:
    index 0 is the embedding output, index i the output of block i (no post-layernorm)."""

    def __init__(self, cfg: VisionConfig, depth: int | None = None):
        """depth: how many blocks to build (the deepest one feature selection reads); defaults to all."""
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        depth = cfg.num_hidden_layers if depth is None else depth
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(depth))

    def forward(self, pixel_values: torch.Tensor, layers: list[int], cls_blocks: tuple[int, ...] = ()):
        """pixel_values [N, C, H, W] -> one [N, P, D] tensor per requested layer index."""
        if cls_blocks:
            raise UserError("a SigLIP vision tower has no class token: methods that read its attention do not apply")
        wanted = [absolute_layer(i, self.cfg.num_hidden_layers) for i in layers]
        x = self.embeddings(pixel_values)
        states = {0: x}
        for i, block in enumerate(self.layers[:max(wanted)], start=1):
            x = block(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]
