"""`fastllava inspect`: the image as the model sees it, with the patches a method keeps
highlighted, merged groups tinted in their representative's colour and dropped patches dimmed.

LLaVA-1.5 gives one square panel. LLaVA-NeXT gives two panels of the whole image: the base
thumbnail's tokens, then the tiles' tokens, each token's patch mapped back to image coordinates
(image_newline tokens are not drawn; the summary counts them)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import anyres
from ..ops import positions_from_mask
from ..images import load_image
from .runtime import make_reduction

SCALE = 448  # side of a drawn tile (a LLaVA-1.5 image is one), pixels
GAP = 8  # between the two LLaVA-NeXT panels, pixels


def kept_owners(model, image, prompt: str, spec) -> tuple[dict, torch.Tensor, object]:
    """Run the prefill of one prompt under `spec`; -> (the model inputs, owner [V] of each visual
    token: itself when kept, the token it was merged into, or -1 when dropped, reduction)."""
    inputs = model.inputs([image], [prompt])
    reduction = make_reduction(spec, model.config)
    model.logits(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]), reduce=reduction)
    return inputs, reduction.owner[0].cpu(), reduction


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 4] (x0, y0, x1, y1) in [0, 1] of the cells of a grid, row by row."""
    y, x = torch.meshgrid(torch.arange(rows) / rows, torch.arange(cols) / cols, indexing="ij")
    return torch.stack([x, y, x + 1 / cols, y + 1 / rows], dim=-1).reshape(-1, 4)


def shade(img: Image.Image, boxes: torch.Tensor, owner: torch.Tensor) -> Image.Image:
    """img with the visual tokens' boxes [V, 4] ((x0, y0, x1, y1) in [0, 1] of img; NaN: not drawn)
    marked by owner [V]: dropped dimmed, merged tinted, kept outlined."""
    w, h = img.size
    owner = owner.tolist()
    drawn = [(p, o, (round(b[0] * w), round(b[1] * h), round(b[2] * w) - 1, round(b[3] * h) - 1))
             for p, (o, b) in enumerate(zip(owner, boxes.tolist())) if not math.isnan(b[0])]
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    merged = {o for p, o in enumerate(owner) if o >= 0 and o != p}
    for p, o, box in drawn:
        if o < 0:
            pen.rectangle(box, fill=(0, 0, 0, 170))  # dropped
        elif o != p:
            pen.rectangle(box, fill=(*_colour(o), 90))  # merged into o
    for p, o, box in drawn:
        if o == p:  # kept (a representative of a merged group is outlined in the group's colour)
            pen.rectangle(box, outline=(*_colour(p), 255) if p in merged else (255, 255, 0, 255), width=2)
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def draw(pixels: torch.Tensor, owner: torch.Tensor, grid: int, mean, std) -> Image.Image:
    """LLaVA-1.5: pixels [3, H, W] (normalised as the processor does), owner [V] (V = grid**2, or 1
    more when the class token is a feature: it is not drawn) -> an RGB overlay."""
    img = pixels.permute(1, 2, 0).float().numpy()
    if mean is not None:
        img = img * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    base = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).resize((SCALE, SCALE), Image.NEAREST)
    boxes = torch.full((owner.shape[0], 4), math.nan)
    boxes[owner.shape[0] - grid * grid:] = _grid_boxes(grid, grid)  # the patches come last
    return shade(base, boxes, owner)


def draw_next(model, image: Image.Image, owner: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
    """LLaVA-NeXT: image (RGB) and owner [V] over its visual tokens -> (two panels, the base
    thumbnail's tokens and the tiles' tokens, over the image at the tiles' scale; part [V]: 0 base,
    1.. tile, -1 image_newline)."""
    cfg, size = model.config, (image.height, image.width)
    tile, g = cfg.vision.image_size, cfg.vision.grid
    canvas = anyres.best_resolution(size, cfg.image_grid_pinpoints)
    src, where = model.model.token_layout(size, anyres.tile_grid(size, cfg.image_grid_pinpoints, tile))  # [V], [V, 2]
    part = torch.where(src >= 0, src // (g * g), -1)  # [V]
    rows = int((src < 0).sum())  # one image_newline ends each row of the tiles' (unpadded) grid
    cols = int((part > 0).sum()) // rows
    half = torch.where((part == 0)[:, None], torch.tensor([0.5 / g, 0.5 / g]), torch.tensor([0.5 / rows, 0.5 / cols]))
    cells = torch.cat([where - half, where + half], dim=1)[:, [1, 0, 3, 2]]  # [V, 4] (x0, y0, x1, y1)
    inner = anyres.fit_size(size, canvas)  # (height, width) of the image on its tiles
    panel = image.resize((round(inner[1] * SCALE / tile), round(inner[0] * SCALE / tile)), Image.BICUBIC)
    panels = [shade(panel, cells.masked_fill(~keep[:, None], math.nan), owner) for keep in (part == 0, part > 0)]
    w, h = panel.size
    side_by_side = w <= h
    out = Image.new("RGB", (2 * w + GAP, h) if side_by_side else (w, 2 * h + GAP), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (w + GAP, 0) if side_by_side else (0, h + GAP))
    return out, part


def annotate(picture: Image.Image, title: list[str]) -> Image.Image:
    """picture under a band with the `title` lines and a legend of the marks `shade` draws."""
    font = ImageFont.load_default()
    band = 16 * len(title) + 24
    out = Image.new("RGB", (max(picture.width, 420), picture.height + band), (255, 255, 255))
    out.paste(picture, (0, band))
    pen = ImageDraw.Draw(out)
    for i, line in enumerate(title):
        pen.text((6, 4 + 16 * i), line, fill=(0, 0, 0), font=font)
    x, y = 6, band - 18
    for label, outline, fill in (("kept", (255, 200, 0), None), ("kept, others merged into it", _colour(3), None),
                                 ("merged", None, tuple(int(0.35 * c + 0.65 * 255) for c in _colour(3))),
                                 ("dropped", None, (80, 80, 80))):
        pen.rectangle((x, y, x + 12, y + 12), outline=outline, fill=fill, width=2)
        pen.text((x + 16, y), label, fill=(0, 0, 0), font=font)
        x += 22 + int(pen.textlength(label, font=font))
    return out


def inspect(model, image, prompt: str, spec, out_path) -> dict:
    """Write the overlay PNG to out_path; -> a summary (kept, merged groups, dropped; on LLaVA-NeXT
    also the kept tokens of the base thumbnail, of the tiles and image_newline tokens)."""
    image = load_image(image)
    inputs, owner, reduction = kept_owners(model, image, prompt, spec)
    kept = owner == torch.arange(owner.shape[0])
    parts = {}
    if model.config.is_next:
        picture, part = draw_next(model, image, owner)
        parts = {"kept_base": int(kept[part == 0].sum()), "kept_tiles": int(kept[part > 0].sum()),
                 "kept_newlines": int(kept[part < 0].sum())}
    else:
        proc = model.processor
        picture = draw(inputs["pixel_values"][0], owner, model.config.vision.grid, proc.mean, proc.std)
    merged_into = owner[(owner >= 0) & ~kept]
    summary = {"reduce": reduction.method.spec(), "visual_tokens": owner.shape[0], "kept": int(kept.sum()),
               "groups": int(merged_into.unique().numel()), "merged": int(merged_into.numel()),
               "dropped": int((owner < 0).sum()), **parts, "out": str(out_path)}
    title = [summary["reduce"], f"{summary['kept']} of {summary['visual_tokens']} visual tokens kept, "
                                f"{summary['merged']} merged into {summary['groups']}, {summary['dropped']} dropped"]
    if parts:
        title.append(f"base thumbnail's tokens ({parts['kept_base']} kept) | tiles' tokens ({parts['kept_tiles']} "
                     f"kept; {parts['kept_newlines']} image_newline tokens kept, not drawn)")
    annotate(picture, title).save(out_path)
    return summary
