"""CLIP-style vision transformer (class token, pre-LN blocks), as used by LLaVA.

Only the hidden states are computed; the tower stops after the deepest layer that the
feature selection needs, so layers LLaVA never reads cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .activations import activation
from .fused import FusedLinear


def absolute_layer(layer: int, num_layers: int) -> int:
    """A transformers hidden-state index (negative counts from the end) as 0..num_layers."""
    return layer if layer >= 0 else num_layers + 1 + layer


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C, H, W]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [N, g*g, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # [N, 1, D]
        x = torch.cat([cls, patches], dim=1)  # [N, 1+g*g, D]
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = FusedLinear(cfg.hidden_size, [cfg.hidden_size] * 3, bias=True)  # q_proj, k_proj, v_proj
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cls_info: bool = False):
        """x [N, T, D] -> out [N, T, D]; with cls_info -> (out, ClsInfo) for reduction methods."""
        n, t, _ = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, N, H, T, Dh]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, H, T, Dh]
        out = self.out_proj(out.transpose(1, 2).reshape(n, t, -1))
        if not cls_info:
            return out
        q_cls = qkv[0][:, :, :1].float()  # [N, H, 1, Dh]
        scores = q_cls @ qkv[1].float().transpose(-1, -2) / self.head_dim ** 0.5  # [N, H, 1, T]
        attention = scores.softmax(-1).mean(1)[:, 0]  # [N, T], averaged over heads
        keys = qkv[1].transpose(1, 2).reshape(n, t, -1)  # [N, T, D]
        return out, ClsInfo(attention, keys)


@dataclass
class ClsInfo:
    """What the class token sees in one block: its attention to every token [N, T] (softmax,
    averaged over heads) and that block's keys [N, T, D] (heads concatenated)."""

    attention: torch.Tensor
    keys: torch.Tensor


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cls_info: bool = False):
        """x [N, T, D] -> x, or (x, ClsInfo) with cls_info (see VisionAttention)."""
        h = self.self_attn(self.layer_norm1(x), cls_info)
        info = None
        if cls_info:
            h, info = h
        x = x + h
        x = x + self.mlp(self.layer_norm2(x))
        return (x, info) if cls_info else x


class VisionTower(nn.Module):
    """Returns the hidden states that LLaVA selects, as transformers numbers them:
    index 0 is the (pre-layernormed) embedding output, index i the output of block i."""

    def __init__(self, cfg: VisionConfig, depth: int | None = None):
        """depth: how many blocks to build (the deepest one feature selection reads);
        defaults to all of them."""
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        depth = cfg.num_hidden_layers if depth is None else depth
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(depth))

    def _absolute(self, layer: int) -> int:
        return absolute_layer(layer, self.cfg.num_hidden_layers)

    def forward(self, pixel_values: torch.Tensor, layers: list[int], cls_blocks: tuple[int, ...] = ()):
        """pixel_values [N, C, H, W] -> one [N, 1+P, D] tensor per requested layer index; with
        cls_blocks (block numbers 1..depth) also the ClsInfo of each of those blocks (None for 0,
        the embedding output)."""
        wanted = [self._absolute(i) for i in layers]
        deepest = max(wanted)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}  # only the hidden states feature selection reads
        infos = {}
        for i, block in enumerate(self.layers[:deepest], start=1):
            if i in cls_blocks:
                x, infos[i] = block(x, True)
            else:
                x = block(x)
            if i in wanted:
                states[i] = x
        selected = [states[i] for i in wanted]
        return (selected, [infos.get(b) for b in cls_blocks]) if cls_blocks else selected
