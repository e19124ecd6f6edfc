"""`fastllava inspect`: the image as the model sees it, with the patches a method keeps
highlighted, merged groups tinted in their representative's colour and dropped patches dimmed."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..generation import positions_from_mask
from .runtime import make_reduction

SCALE = 448  # side of the drawn image, pixels


def kept_owners(model, image, prompt: str, spec) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Run the prefill of one prompt under `spec`; -> (pixel_values [1, 3, H, W], owner [V] of each
    visual token: itself when kept, the token it was merged into, or -1 when dropped, reduction)."""
    ids, mask, pixels = model.encode([image], [prompt])
    reduction = make_reduction(spec, model.config)
    model.logits(ids, pixels, mask, positions_from_mask(mask), reduce=reduction)
    return pixels, reduction.owner[0].cpu(), reduction


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(pixels: torch.Tensor, owner: torch.Tensor, grid: int, mean, std) -> Image.Image:
    """pixels [3, H, W] (normalised as the processor does), owner [V] (V = grid**2, or 1 more when
    the class token is a feature: it is not drawn) -> an RGB overlay."""
    img = pixels.permute(1, 2, 0).float().numpy()
    if mean is not None:
        img = img * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    base = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).resize((SCALE, SCALE), Image.NEAREST)
    owner = owner[owner.shape[0] - grid * grid:] - (owner.shape[0] - grid * grid)  # patches only
    cell = SCALE / grid
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(shade)
    merged = {int(o) for p, o in enumerate(owner.tolist()) if o >= 0 and o != p}
    for p, o in enumerate(owner.tolist()):
        box = ((p % grid) * cell, (p // grid) * cell, (p % grid + 1) * cell - 1, (p // grid + 1) * cell - 1)
        if o < 0:
            pen.rectangle(box, fill=(0, 0, 0, 170))  # dropped
        elif o != p:
            pen.rectangle(box, fill=(*_colour(o), 90))  # merged into o
    for p, o in enumerate(owner.tolist()):
        if o == p:  # kept (a representative of a merged group is outlined in the group's colour)
            box = ((p % grid) * cell, (p // grid) * cell, (p % grid + 1) * cell - 1, (p // grid + 1) * cell - 1)
            pen.rectangle(box, outline=(*_colour(p), 255) if p in merged else (255, 255, 0, 255), width=2)
    return Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")


def inspect(model, image, prompt: str, spec, out_path) -> dict:
    """Write the overlay PNG to out_path; -> a summary (kept, merged groups, dropped)."""
    pixels, owner, reduction = kept_owners(model, image, prompt, spec)
    proc = model.processor
    draw(pixels[0], owner, model.config.vision.grid, proc.mean, proc.std).save(out_path)
    kept = owner == torch.arange(owner.shape[0])
    merged_into = owner[(owner >= 0) & ~kept]
    return {"reduce": reduction.method.spec(), "visual_tokens": owner.shape[0], "kept": int(kept.sum()),
            "groups": int(merged_into.unique().numel()), "merged": int(merged_into.numel()),
            "dropped": int((owner < 0).sum()), "out": str(out_path)}
