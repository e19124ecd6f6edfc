"""Small tensor helpers that every layer of fastllava may use: attention masks over cache slots,
positions of left-padded prompts, left padding, right padding, rounding."""

from __future__ import annotations

import torch


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """Left-padded mask [B, T] -> positions [B, T] counting real tokens only (pads get 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, T] left-padded with `pad`, valid [B, T] bool) with T the longest."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
            valid[i, longest - len(r):] = True
    return ids, valid


def pad_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] with n zeros (False) after each row -> [B, T + n, ...]."""
    return torch.cat([x, x.new_zeros(x.shape[0], n, *x.shape[2:])], dim=1) if n else x


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_mask(key_valid: torch.Tensor | None, start: int | torch.Tensor, t: int, span: int,
                   window: int | None = None, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """The mask [B, 1, T, S=span] for T queries at slots start..start+T (start an int or a
    one-element tensor) over the keys at slots 0..span: causal, within `window` slots if given,
    and only keys that key_valid [B, S] marks (None: all; B = 1). A query still sees its own slot,
    so that attention stays finite for padding. Boolean (True = attend), or with bias [B, S] (an
    additive logit per key: merged tokens' proportional attention) additive floats of `dtype`
    (-inf where not attended). `device` is the mask's where key_valid is None."""
    device = key_valid.device if key_valid is not None else device
    q_slot = torch.arange(t, device=device)[:, None] + start  # [T, 1]
    k_slot = torch.arange(span, device=device)[None, :]  # [1, S]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    mask = allowed[None] if key_valid is None else allowed[None] & key_valid[:, None, :]  # [B, T, S]
    mask = (mask | (k_slot == q_slot)[None])[:, None]
    if bias is None:
        return mask
    return torch.where(mask, bias[:, None, None, :].to(dtype), float("-inf"))
