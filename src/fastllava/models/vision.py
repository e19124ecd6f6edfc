"""CLIP-style vision transformer (class token, pre-LN blocks), as used by LLaVA.

Only the hidden states are computed; the tower stops after the deepest layer that the
feature selection needs, so layers LLaVA never reads cost nothing.

A TowerPlan (token reduction inside the tower) is called after each block with what that block's
attention reported (only what the plan asked for) and may shrink the token set: drop tokens or
merge them into others. Rows of a batch may keep different counts: they are packed to the left and
padded on the right, padding masked out of every later attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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

    def forward(self, x: torch.Tensor, cls_info: bool = False, mask: torch.Tensor | None = None,
                probe: tuple[str, ...] = ()):
        """x [N, T, D] -> out [N, T, D]; with cls_info -> (out, ClsInfo) for reduction methods; with
        `probe` (see Probe) -> (out, Probe). mask [N, 1, 1, T] float is added to every query's
        attention logits (padding -inf, proportional attention log(size)), or None."""
        n, t, _ = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, N, H, T, Dh]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # [N, H, T, Dh]
        out = self.out_proj(out.transpose(1, 2).reshape(n, t, -1))
        if probe:
            return out, self._probe(qkv, mask, probe)
        if not cls_info:
            return out
        q_cls = qkv[0][:, :, :1].float()  # [N, H, 1, Dh]
        scores = q_cls @ qkv[1].float().transpose(-1, -2) / self.head_dim ** 0.5  # [N, H, 1, T]
        attention = scores.softmax(-1).mean(1)[:, 0]  # [N, T], averaged over heads
        keys = qkv[1].transpose(1, 2).reshape(n, t, -1)  # [N, T, D]
        return out, ClsInfo(attention, keys)

    def _probe(self, qkv: torch.Tensor, mask: torch.Tensor | None, wants: tuple[str, ...]) -> Probe:
        """The parts of Probe in `wants`, computed beside the fused attention: the class token's
        row alone for "cls", every row (explicitly, this block only) for "attention"."""
        q, k, v = qkv.float().unbind(0)  # [N, H, T, Dh] each
        bias = 0 if mask is None else mask.float()  # [N, 1, 1, T]
        probe = Probe(keys=k if "keys" in wants else None, values=v if "values" in wants else None)
        if "cls" in wants:
            probe.cls = (q[:, :, :1] @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias).softmax(-1)[:, :, 0]  # [N, H, T]
        if "attention" in wants:
            probe.attention = (q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias).softmax(-1).mean(1)  # [N, T, T]
        return probe


@dataclass
class ClsInfo:
    """What the class token sees in one block: its attention to every token [N, T] (softmax,
    averaged over heads) and that block's keys [N, T, D] (heads concatenated)."""

    attention: torch.Tensor
    keys: torch.Tensor


@dataclass
class Probe:
    """What one block's attention reports to a TowerPlan; only the parts named in its wants()
    ("cls", "keys", "values", "attention"), the others None. Float32."""

    cls: torch.Tensor | None = None  # [N, H, T] the class token's attention to every token (softmax), per head
    keys: torch.Tensor | None = None  # [N, H, T, Dh]
    values: torch.Tensor | None = None  # [N, H, T, Dh]
    attention: torch.Tensor | None = None  # [N, T, T] every query's attention (softmax), averaged over heads


@dataclass
class Shrink:
    """A TowerPlan's answer after a block: `into` [N, T] long gives, for each current token, the
    current token it belongs to from now on: itself (kept), another kept token or -1 (dropped);
    padding is ignored and a class token is always kept. With `merge`, each kept token goes on as the
    mean of its group's states weighted by the original tokens each stands for (Tokens.sizes), and
    stands for their sum; without it, tokens given to another are dropped (but counted as its
    group's, for the record). With `prop`, every later block adds log(size) to the attention logits
    of each key (proportional attention)."""

    into: torch.Tensor
    merge: bool = False
    prop: bool = False


@dataclass
class Tokens:
    """The token set of a tower run under a plan. Rows are packed to the left, padded on the right."""

    index: torch.Tensor  # [N, T] long: each token's place among the tower's original tokens (class token first)
    alive: torch.Tensor  # [N, T] bool: real tokens (False: padding)
    sizes: torch.Tensor  # [N, T] float: original tokens each stands for
    owner: torch.Tensor  # [N, T0] long: current place of the token each original token belongs to, -1 dropped
    cls: bool  # whether token 0 of every row is a class token
    prop: bool = False  # proportional attention (a Shrink gave sizes)

    @classmethod
    def start(cls, x: torch.Tensor, class_token: bool) -> Tokens:
        n, t, _ = x.shape
        index = torch.arange(t, device=x.device).expand(n, -1)
        return cls(index, torch.ones(n, t, dtype=torch.bool, device=x.device), torch.ones(n, t, device=x.device),
                   index.clone(), class_token)

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention mask [N, 1, 1, T] for the current set, None when nothing is masked."""
        if not self.prop and bool(self.alive.all()):
            return None
        bias = self.sizes.log() if self.prop else torch.zeros_like(self.sizes)
        return bias.masked_fill(~self.alive, float("-inf")).to(dtype)[:, None, None, :]

    def apply(self, shrink: Shrink, x: torch.Tensor) -> torch.Tensor:
        """Shrink the set (and x [N, T, D]) as `shrink` says -> the kept tokens' states [N, T', D]."""
        n, t = self.alive.shape
        place = torch.arange(t, device=x.device).expand(n, -1)
        into = shrink.into.masked_fill(~self.alive, -1)
        if self.cls:
            into[:, 0] = 0
        keep = (into == place) & self.alive  # [N, T]
        counts = keep.sum(1)
        width = max(int(counts.max()), 1)
        order = (~keep).long().argsort(dim=1, stable=True)[:, :width]  # [N, T'] kept tokens first, in order
        alive = torch.arange(width, device=x.device)[None] < counts[:, None]
        new = torch.full((n, t), -1, dtype=torch.long, device=x.device).scatter_(
            1, order, torch.arange(width, device=x.device).expand(n, -1).masked_fill(~alive, -1))  # [N, T]
        new = new.masked_fill(~keep, -1)
        target = new.gather(1, into.clamp(min=0)).masked_fill(into < 0, -1)  # [N, T] new place of each token's owner
        self.owner = torch.where(self.owner >= 0, target.gather(1, self.owner.clamp(min=0)), self.owner)
        if shrink.merge:
            w = (into >= 0).to(torch.float32) * self.sizes  # [N, T]
            idx = into.clamp(min=0)
            sums = torch.zeros(x.shape, dtype=torch.float32, device=x.device).scatter_add_(
                1, idx[..., None].expand_as(x), x.float() * w[..., None])
            self.sizes = torch.zeros_like(self.sizes).scatter_add_(1, idx, w).clamp(min=1e-6)
            x = (sums / self.sizes[..., None]).to(x.dtype)
        self.prop = self.prop or shrink.prop
        self.sizes = self.sizes.gather(1, order).masked_fill(~alive, 1)
        self.index = self.index.gather(1, order)
        self.alive = alive
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


class TowerPlan(Protocol):
    """Token reduction inside the tower: after block `block` (1-based) the tower calls step() with
    the block's output x [N, T, D], what its attention reported (the parts wants(block) named) and
    the current Tokens; step returns a Shrink or None (keep every token)."""

    def wants(self, block: int) -> tuple[str, ...]: ...

    def step(self, block: int, x: torch.Tensor, probe: Probe | None, tokens: Tokens) -> Shrink | None: ...


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

    def forward(self, x: torch.Tensor, cls_info: bool = False, mask: torch.Tensor | None = None,
                probe: tuple[str, ...] = ()):
        """x [N, T, D] -> x, or (x, ClsInfo) with cls_info, or (x, Probe) with probe (see VisionAttention)."""
        h = self.self_attn(self.layer_norm1(x), cls_info, mask, probe)
        info = None
        if cls_info or probe:
            h, info = h
        x = x + h
        x = x + self.mlp(self.layer_norm2(x))
        return (x, info) if cls_info or probe else x


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

    def forward(self, pixel_values: torch.Tensor, layers: list[int], cls_blocks: tuple[int, ...] = (),
                plan: TowerPlan | None = None):
        """pixel_values [N, C, H, W] -> one [N, 1+P, D] tensor per requested layer index; with
        cls_blocks (block numbers 1..depth) also the ClsInfo of each of those blocks (None for 0,
        the embedding output). With a `plan` (not with cls_blocks) -> (one [N, T', D] tensor per
        layer, holding the tokens that are left after the deepest one, the final Tokens)."""
        wanted = [self._absolute(i) for i in layers]
        deepest = max(wanted)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        tokens = None if plan is None else Tokens.start(x, True)
        states = {0: (x, None if tokens is None else tokens.index)}  # only the hidden states feature selection reads
        infos = {}
        for i, block in enumerate(self.layers[:deepest], start=1):
            wants = plan.wants(i) if plan is not None else ()
            mask = None if tokens is None else tokens.mask(x.dtype)
            probe = None
            if i in cls_blocks:
                x, infos[i] = block(x, True)
            elif wants:
                x, probe = block(x, mask=mask, probe=wants)
            else:
                x = block(x, mask=mask)
            if plan is not None:
                shrink = plan.step(i, x, probe, tokens)
                if shrink is not None:
                    x = tokens.apply(shrink, x)
            if i in wanted:
                states[i] = (x, None if tokens is None else tokens.index)
        if plan is not None:
            return [_regather(*states[i], tokens.index) for i in wanted], tokens
        selected = [states[i][0] for i in wanted]
        return (selected, [infos.get(b) for b in cls_blocks]) if cls_blocks else selected


def _regather(x: torch.Tensor, index: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """States x [N, T, D] of the tokens at original places index [N, T] -> those of the tokens at
    final [N, T'] (a subset, or padding: any row)."""
    if index.shape == final.shape and torch.equal(index, final):
        return x
    lut = torch.zeros(x.shape[0], int(index.max()) + 1, dtype=torch.long, device=x.device)
    lut.scatter_(1, index, torch.arange(index.shape[1], device=x.device).expand_as(index))
    return x.gather(1, lut.gather(1, final.clamp(max=lut.shape[1] - 1))[..., None].expand(-1, -1, x.shape[-1]))
