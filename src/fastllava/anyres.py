"""LLaVA-NeXT "AnyRes" geometry: which tile grid an image gets, how it is resized into that
grid, and which part of the tiles' feature grid holds the image rather than padding.

Sizes are (height, width) in pixels throughout; `pinpoints` are the checkpoint's
`image_grid_pinpoints`, the canvas sizes an image may be tiled at. The arithmetic (float
rounding included) follows transformers' LlavaNextImageProcessor and LlavaNextModel, so that
token counts and unpadding agree with it exactly.
"""

from __future__ import annotations

import math

from .errors import UserError

Size = tuple[int, int]  # (height, width)


def best_resolution(size: Size, pinpoints: list[Size]) -> Size:
    """The canvas that keeps most of the image's pixels once it is scaled to fit, and among
    those the one that wastes the fewest."""
    h, w = size
    best, most_kept, least_wasted = pinpoints[0], -1, math.inf
    for ch, cw in pinpoints:
        scale = min(cw / w, ch / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        wasted = ch * cw - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (ch, cw), kept, wasted
    return best


def fit_size(size: Size, canvas: Size) -> Size:
    """The size the image is resized to inside `canvas`: aspect ratio kept, one side filling it."""
    h, w = size
    ch, cw = canvas
    if cw / w < ch / h:
        return min(math.ceil(h * cw / w), ch), cw
    return ch, min(math.ceil(w * ch / h), cw)


def pad_offsets(inner: Size, canvas: Size) -> tuple[int, int]:
    """(top, left) at which `inner` is pasted centred on `canvas` (the remainder goes after)."""
    return (canvas[0] - inner[0]) // 2, (canvas[1] - inner[1]) // 2


def tile_grid(size: Size, pinpoints: list[Size], tile: int) -> Size:
    """(rows, cols) of tiles the image is cut into."""
    ch, cw = best_resolution(size, pinpoints)
    return ch // tile, cw // tile


def unpadded_box(size: Size, grid: Size) -> tuple[slice, slice]:
    """Rows and columns of a feature grid of shape `grid` (the tiles' patch grids side by side)
    that show the image of `size`, the padding around it cut off."""
    h, w = size
    gh, gw = grid
    if w / h > gw / gh:  # wider than the grid: padding above and below
        pad = (gh - int(round(h * (gw / w), 7))) // 2
        return slice(pad, gh - pad), slice(0, gw)
    pad = (gw - int(round(w * (gh / h), 7))) // 2
    return slice(0, gh), slice(pad, gw - pad)


def image_tokens(size: Size, pinpoints: list[Size], tile: int, patches: int, max_tiles: int | None = None) -> int:
    """Visual tokens one image of `size` gives the language model: the base image's
    patches x patches features, then the unpadded tile features with one newline per row
    (with `max_tiles`, LLaVA-OneVision's anyres_max_N, scaled down as `scaled_grid` says)."""
    rows, cols = tile_grid(size, pinpoints, tile)
    ys, xs = unpadded_box(size, (rows * patches, cols * patches))
    height, width = ys.stop - ys.start, xs.stop - xs.start
    if max_tiles is not None:
        height, width = scaled_grid((height, width), patches, max_tiles)
    return patches * patches + height * (width + 1)


def scaled_grid(grid: Size, patches: int, max_tiles: int) -> Size:
    """LLaVA-OneVision's anyres_max_N: an unpadded feature grid (height, width) of more than
    1.1² times N tiles' patches x patches features is scaled down (bilinearly, by the model) to
    about N tiles' worth, aspect ratio kept; a smaller one stays as it is."""
    h, w = grid
    ratio = math.sqrt(h * w / (max_tiles * patches ** 2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def token_sources(size: Size, grid: Size, patches: int) -> tuple[list[int], Size]:
    """The visual tokens of one image of `size` tiled as `grid` (rows, cols), in the language
    model's order -> (src: for each token the index of its patch among the image's pieces'
    patches [(1 + rows*cols) * patches²] (base thumbnail first, then the tiles row by row), -1 for
    the newline ending each row; (height, width) of the unpadded tile feature grid)."""
    rows, cols = grid
    g = patches
    ys, xs = unpadded_box(size, (rows * g, cols * g))
    src = list(range(g * g))
    for y in range(ys.start, ys.stop):
        tile_row, py = divmod(y, g)
        for x in range(xs.start, xs.stop):
            tile_col, px = divmod(x, g)
            src.append(g * g * (1 + tile_row * cols + tile_col) + py * g + px)
        src.append(-1)
    return src, (ys.stop - ys.start, xs.stop - xs.start)


def piece_boxes(size: Size, pinpoints: list[Size], tile: int) -> list[tuple[float, float, float, float]]:
    """Where each piece the processor cuts from an image of `size` lies in the image: (top, left,
    height, width) as fractions of the image's height and width, base thumbnail (the whole image)
    first, then the tiles row by row (a tile over padding reaches outside [0, 1])."""
    canvas = best_resolution(size, pinpoints)
    inner = fit_size(size, canvas)
    top, left = pad_offsets(inner, canvas)
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for y in range(0, canvas[0], tile):
        for x in range(0, canvas[1], tile):
            boxes.append(((y - top) / inner[0], (x - left) / inner[1], tile / inner[0], tile / inner[1]))
    return boxes


def image_tiling(n: int, batch_num_images: list[int] | None) -> list[bool]:
    """Whether each of n images is tiled: those of prompts with one image (LLaVA-OneVision's
    batch_num_images: images per prompt, in order; None: one each)."""
    if batch_num_images is None:
        return [True] * n
    if hasattr(batch_num_images, "tolist"):  # a tensor, as transformers' processor returns it
        batch_num_images = batch_num_images.tolist()
    if any(not isinstance(k, int) or k < 0 for k in batch_num_images) or sum(batch_num_images) != n:
        raise UserError(f"batch_num_images {list(batch_num_images)} does not count the {n} images")
    return [k == 1 for k in batch_num_images for _ in range(k)]
