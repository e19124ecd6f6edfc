"""Reading images safely and CLIP preprocessing (`preprocessor_config.json`).

The preprocessing follows transformers' `CLIPImageProcessor`: resize the shortest edge with
PIL (bicubic by default), center crop, rescale to [0, 1], normalize with the CLIP mean and std.
`pad_to_square` is the original LLaVA repo's `image_aspect_ratio="pad"`: the image is first
pasted centred on a square canvas filled with the mean colour.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import anyres
from .config import read_json_object
from .errors import UserError

ImageInput = Union[Image.Image, np.ndarray, str, Path, bytes]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs), and larger images made by preprocessing
MAX_ASPECT = 100  # longer side / shorter side: beyond, the shortest-edge resize blows the longer side up


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image in RGB from a PIL image, an HWC/HW numpy array (uint8, or float in [0, 1]),
    a path, or encoded bytes. Bad input raises UserError with one line saying why, as do images
    over `max_pixels` or whose sides differ more than MAX_ASPECT-fold (read before decoding)."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), "image bytes", max_pixels)
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.exists():
            raise UserError(f"image {path} does not exist")
        if not path.is_file():
            raise UserError(f"image {path} is not a file")
        if path.stat().st_size == 0:
            raise UserError(f"image {path} is an empty file")
        with path.open("rb") as f:
            return _decode(f, f"image {path}", max_pixels)
    raise UserError(f"unsupported image type {type(image).__name__}; give a PIL image, numpy array, path or bytes")


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise UserError(f"{what} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise UserError(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UserError(f"{what} is {w}x{h}; its sides may differ at most {MAX_ASPECT}-fold")


def _decode(stream, what: str, max_pixels: int) -> Image.Image:
    if stream.seek(0, io.SEEK_END) == 0:
        raise UserError(f"{what} is empty")
    stream.seek(0)
    try:
        with Image.open(stream) as img:
            _check_pixels(img.size, max_pixels, what)  # before decoding a single pixel
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{what} is not an image (format not recognised)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{what} is too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{what} is corrupt or truncated: {e}") from None


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise UserError(f"numpy image must be HxW or HxWxC with C in 1, 3, 4; got shape {arr.shape}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, "numpy image")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"numpy image has unsupported dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


@dataclass
class ImageProcessor:
    """CLIP image preprocessing with transformers' `CLIPImageProcessor` semantics."""

    shortest_edge: int | None = 336
    size_hw: tuple[int, int] | None = None  # resize to exactly (height, width) instead
    crop_hw: tuple[int, int] | None = (336, 336)
    resample: int = 3  # PIL bicubic
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD
    pad_to_square: bool = False

    @classmethod
    def from_config(cls, d: dict, default_size: int) -> "ImageProcessor":
        size = d.get("size", {"shortest_edge": default_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = d.get("crop_size", {"height": default_size, "width": default_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do = lambda key: d.get(key, True)  # noqa: E731
        return cls(
            shortest_edge=size.get("shortest_edge") if do("do_resize") else None,
            size_hw=(size["height"], size["width"]) if do("do_resize") and "height" in size else None,
            crop_hw=(crop["height"], crop["width"]) if do("do_center_crop") else None,
            resample=int(d.get("resample", 3)),
            rescale_factor=d.get("rescale_factor", 1 / 255) if do("do_rescale") else None,
            mean=tuple(d.get("image_mean", CLIP_MEAN)) if do("do_normalize") else None,
            std=tuple(d.get("image_std", CLIP_STD)) if do("do_normalize") else None,
            pad_to_square=bool(d.get("do_pad", False) or d.get("image_aspect_ratio") == "pad"),
        )

    @classmethod
    def from_dir(cls, path: Path, default_size: int) -> "ImageProcessor":
        file = path / "preprocessor_config.json"
        if not file.exists():
            return cls(shortest_edge=default_size, crop_hw=(default_size, default_size))
        try:
            return cls.from_config(read_json_object(file, "image processor config"), default_size)
        except (AttributeError, KeyError, TypeError) as e:
            raise UserError(f"{file} is not a valid image processor config: {e}") from None

    def __call__(self, images: list[ImageInput]) -> torch.Tensor:
        """Images -> pixel_values [N, 3, H, W] float32."""
        return torch.stack([self.one(load_image(im)) for im in images])

    def one(self, img: Image.Image) -> torch.Tensor:
        """One RGB image -> [3, H, W]; refuses (UserError) to make an image over DEFAULT_MAX_PIXELS."""
        source = img.size
        if self.pad_to_square:
            _check_made(source, (max(source),) * 2, "padded to a square")
            img = expand_to_square(img, tuple(int(m * 255) for m in (self.mean or CLIP_MEAN)))
        size = None  # (width, height) to resize to
        if self.size_hw is not None:
            size = (self.size_hw[1], self.size_hw[0])
        elif self.shortest_edge is not None:
            size = _shortest_edge_size(img.size, self.shortest_edge)
        if size is not None:
            _check_made(source, size, "resized")
            img = img.resize(size, resample=self.resample)
        arr = np.asarray(img)  # [H, W, 3] uint8
        if self.crop_hw is not None:
            arr = center_crop(arr, self.crop_hw)
        if self.rescale_factor is not None:
            out = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            out = arr.astype(np.float32)
        if self.mean is not None:
            out = (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))  # [3, H, W]


@dataclass
class AnyresProcessor:
    """LLaVA-NeXT preprocessing with transformers' LlavaNextImageProcessor semantics: the image
    is resized to fit its best canvas among `pinpoints` (aspect ratio kept), pasted centred on
    it over black, and cut into tile x tile pieces row by row; a base thumbnail (the whole image
    resized to `base_hw`) goes first. Each piece then goes through `pieces` (CLIP resize, crop,
    rescale, normalize)."""

    pieces: ImageProcessor
    pinpoints: list[tuple[int, int]]
    tile: int
    base_hw: tuple[int, int]

    @classmethod
    def from_dir(cls, path: Path, pinpoints: list[tuple[int, int]], tile: int) -> "AnyresProcessor":
        """From preprocessor_config.json, with the model's pinpoints and tile size (its `do_pad`
        means padding the batch's tile counts, which always happens, not padding to a square)."""
        pieces = ImageProcessor.from_dir(path, tile)
        pieces.pad_to_square = False
        base = pieces.size_hw or (pieces.shortest_edge or tile,) * 2
        return cls(pieces, pinpoints, tile, base)

    def __call__(self, images: list[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (pixel_values [N, P, 3, tile, tile] float32, the tiles of each image followed by
        zeros up to the most tiles P; image_sizes [N, 2] (height, width) int64)."""
        tiles, image_sizes = self.tiles(images)
        most = max(t.shape[0] for t in tiles)
        pixel_values = torch.stack([torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for t in tiles])
        return pixel_values, image_sizes

    def tiles(self, images: list[ImageInput]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (each image's pieces [1 + rows*cols, 3, tile, tile] (see `one`), unpadded;
        image_sizes [N, 2] (height, width) int64)."""
        loaded = [load_image(im) for im in images]
        return [self.one(img) for img in loaded], torch.tensor([[img.height, img.width] for img in loaded],
                                                               dtype=torch.long)

    def one(self, img: Image.Image) -> torch.Tensor:
        """One RGB image -> [1 + rows*cols, 3, tile, tile]: the base thumbnail, then the tiles."""
        size = (img.height, img.width)
        canvas = anyres.best_resolution(size, self.pinpoints)
        inner = anyres.fit_size(size, canvas)
        top, left = anyres.pad_offsets(inner, canvas)
        padded = Image.new("RGB", (canvas[1], canvas[0]), (0, 0, 0))
        padded.paste(img.resize((inner[1], inner[0]), resample=self.pieces.resample), (left, top))
        t = self.tile
        pieces = [img.resize((self.base_hw[1], self.base_hw[0]), resample=self.pieces.resample)]
        pieces += [padded.crop((x, y, x + t, y + t)) for y in range(0, canvas[0], t) for x in range(0, canvas[1], t)]
        return torch.stack([self.pieces.one(p) for p in pieces])


@dataclass
class OnevisionProcessor(AnyresProcessor):
    """LLaVA-OneVision preprocessing with transformers' LlavaOnevisionImageProcessor semantics: as
    LLaVA-NeXT's, but the base thumbnail and every tile are resized to exactly `size` (height x
    width; a shortest_edge means a square) and never center-cropped unless do_center_crop is true.
    An image that shares its prompt with other images is not tiled: it is padded to a square with
    the mean colour and resized to `size`, one piece (transformers' batch_num_images)."""

    @classmethod
    def from_dir(cls, path: Path, pinpoints: list[tuple[int, int]], tile: int) -> "OnevisionProcessor":
        """From preprocessor_config.json (`tile`, the tower's image size, when it says nothing)."""
        file = path / "preprocessor_config.json"
        d = read_json_object(file, "image processor config")
        size = d.get("size") or {"height": tile, "width": tile}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(size, dict) and "height" not in size and "shortest_edge" in size:
            size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        d["size"] = size
        if not d.get("do_center_crop") or not d.get("crop_size"):
            d["do_center_crop"] = False
            d.pop("crop_size", None)
        try:
            pieces = ImageProcessor.from_config(d, tile)
        except (AttributeError, KeyError, TypeError) as e:
            raise UserError(f"{file} is not a valid image processor config: {e}") from None
        pieces.pad_to_square = False  # do_pad pads the batch's tile counts, which always happens
        return cls(pieces, pinpoints, tile, pieces.size_hw)

    def __call__(self, images: list[ImageInput], batch_num_images: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (pixel_values [N, P, 3, tile, tile], image_sizes [N, 2]) as AnyresProcessor's;
        `batch_num_images`: how many images each prompt holds, in order (None: one each); the
        images of a prompt with several are not tiled (one piece each)."""
        tiles, image_sizes = self.tiles(images, batch_num_images)
        most = max(t.shape[0] for t in tiles)
        pixel_values = torch.stack([torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for t in tiles])
        return pixel_values, image_sizes

    def tiles(self, images: list[ImageInput], batch_num_images: list[int] | None = None
              ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (each image's pieces, unpadded; image_sizes [N, 2] (height, width) int64)."""
        tiled = anyres.image_tiling(len(images), batch_num_images)
        loaded = [load_image(im) for im in images]
        return ([self.one(img) if t else self.single(img) for img, t in zip(loaded, tiled)],
                torch.tensor([[img.height, img.width] for img in loaded], dtype=torch.long))

    def single(self, img: Image.Image) -> torch.Tensor:
        """An untiled image -> [1, 3, H, W]: padded to a square with the mean colour, resized to `size`."""
        fill = tuple(int(m * 255) for m in (self.pieces.mean or CLIP_MEAN))
        _check_made(img.size, (max(img.size),) * 2, "padded to a square")
        return self.pieces.one(expand_to_square(img, fill))[None]


def _check_made(source: tuple[int, int], size: tuple[int, int], how: str) -> None:
    w, h = size
    if w * h > DEFAULT_MAX_PIXELS:
        raise UserError(f"a {source[0]}x{source[1]} image {how} would be {w}x{h} = {w * h} pixels, "
                        f"over the limit of {DEFAULT_MAX_PIXELS}")


def _shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """PIL (width, height) whose shorter side is `edge`, the longer one scaled and truncated."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = edge, int(edge * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def center_crop(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Crop [H, W, C] to hw around the centre, zero-padding first when the image is smaller."""
    h, w = arr.shape[:2]
    ch, cw = hw
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        canvas = np.zeros((ph, pw, arr.shape[2]), arr.dtype)
        top, left = (ph - h) // 2, (pw - w) // 2
        canvas[top:top + h, left:left + w] = arr
        arr, h, w = canvas, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top:top + ch, left:left + cw]


def expand_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas



# ---- videos (LLaVA-OneVision, LLaVA-NeXT-Video) ----

VideoInput = Union[list, tuple, np.ndarray, str, Path]
DEFAULT_NUM_FRAMES = 8  # frames sampled from a video when the checkpoint's video processor says nothing
MAX_NUM_FRAMES = 256  # refuse to sample more frames than this from one video
MAX_SOURCE_FRAMES = 1_000_000  # refuse videos (or frame folders) with more frames than this
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")
# the only FFmpeg demuxers a video file may open with (those of VIDEO_SUFFIXES): never a playlist (hls),
# concat list or image sequence, whose entries would make FFmpeg read other files or URLs
VIDEO_DEMUXERS = "mov,matroska,avi,gif"


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Uniformly spaced frame indices, as transformers' default_sample_indices_fn: i * total //
    num_frames for i < num_frames (every frame when the video has no more than num_frames)."""
    if total <= num_frames:
        return list(range(total))
    return [i * total // num_frames for i in range(num_frames)]


def check_num_frames(num_frames) -> int:
    integer = isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool)
    if not integer or not 1 <= num_frames <= MAX_NUM_FRAMES:
        raise UserError(f"num_frames must be an integer from 1 to {MAX_NUM_FRAMES}, got {num_frames!r}")
    return int(num_frames)


def load_video(video: VideoInput, num_frames: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """The sampled frames (RGB PIL images) of a video given as a list of frames (PIL images,
    HxWx3 arrays, paths or bytes), a numpy array [T, H, W, 3], a folder of frame images (sorted by
    name), a .npy file [T, H, W, 3], or a video file (mp4, webm, gif, ...: needs PyAV, the extra
    fastllava[video]). `num_frames` frames are sampled uniformly (see sample_indices); only those
    are decoded. Bad input raises UserError with one line."""
    num_frames = check_num_frames(num_frames)
    if isinstance(video, (str, Path)):
        return _load_video_path(Path(video).expanduser(), num_frames, max_pixels)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
            raise UserError(f"a numpy video must be [frames, height, width, 3], got shape {list(video.shape)}")
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise UserError(f"unsupported video type {type(video).__name__}; give a list of frames, a numpy array "
                        "[frames, height, width, 3] or a path")
    _check_frame_count(len(frames), "video")
    return [load_image(frames[i], max_pixels) for i in sample_indices(len(frames), num_frames)]


def _check_frame_count(n: int, what: str) -> None:
    if n == 0:
        raise UserError(f"{what} has no frames")
    if n > MAX_SOURCE_FRAMES:
        raise UserError(f"{what} has {n} frames, over the limit of {MAX_SOURCE_FRAMES}")


def check_video_path(path: str | Path) -> Path:
    """A video path's cheap checks (it exists; a video file needs PyAV), before loading a model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"video {path} does not exist")
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        _import_av(f"{path.suffix} videos")
    return path


class VideoTooLarge(UserError):
    """A video over a limit given to load_video_bytes: its pixels per frame, frames or duration."""


def _import_av(what: str):
    try:
        import av
    except ImportError:
        raise UserError(f"reading {what} needs PyAV: pip install 'fastllava[video]' (or give a folder of frames or a "
                        ".npy array)") from None
    return av


def _load_video_path(path: Path, num_frames: int, max_pixels: int) -> list[Image.Image]:
    if not path.exists():
        raise UserError(f"video {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        _check_frame_count(len(files), f"video folder {path}")
        return [load_image(files[i], max_pixels) for i in sample_indices(len(files), num_frames)]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"video {path} is not a readable .npy array: {e}") from None
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise UserError(f"video {path} must hold an array [frames, height, width, 3], got shape {list(arr.shape)}")
        _check_frame_count(arr.shape[0], f"video {path}")
        return [load_image(np.asarray(arr[i]), max_pixels) for i in sample_indices(arr.shape[0], num_frames)]
    if suffix in VIDEO_SUFFIXES:
        av = _import_av(f"{suffix} videos")
        return _decode_video(av, lambda: str(path), f"video {path}", num_frames, max_pixels)
    raise UserError(f"video {path}: give a folder of frame images, a .npy array [frames, height, width, 3] or a "
                    f"video file ({', '.join(VIDEO_SUFFIXES)})")


def load_video_bytes(data: bytes, num_frames: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                     max_frames: int = MAX_SOURCE_FRAMES, max_seconds: float | None = None,
                     what: str = "the video") -> list[Image.Image]:
    """The sampled frames of an encoded video file held in memory (mp4, webm, ...; needs PyAV), as
    load_video reads a file. Limits: VideoTooLarge (a UserError) for a frame over `max_pixels`, more
    than `max_frames` frames, or a duration the container declares over `max_seconds`; any other
    problem (not a video, corrupt) is a UserError; each message is one line."""
    num_frames = check_num_frames(num_frames)
    if not data:
        raise UserError(f"{what} is empty")
    av = _import_av("encoded videos (mp4, webm, ...)")
    return _decode_video(av, lambda: io.BytesIO(data), what, num_frames, max_pixels, max_frames, max_seconds)


def _decode_video(av, source, what: str, num_frames: int, max_pixels: int, max_frames: int = MAX_SOURCE_FRAMES,
                  max_seconds: float | None = None) -> list[Image.Image]:
    """Decode the sampled frames of the video `source()` opens (a path, or a fresh file object),
    in two passes: the first counts the frames when the header does not say (at most max_frames +
    1 decoded), the second converts only the sampled frames to images. Only VIDEO_DEMUXERS open it."""
    options = {"format_whitelist": VIDEO_DEMUXERS}
    try:
        with av.open(source(), container_options=options) as container:
            if not container.streams.video:
                raise UserError(f"{what} holds no video stream")
            stream = container.streams.video[0]
            if stream.width and stream.height:  # else checked on the decoded frames
                _check_frame_pixels(stream.width, stream.height, max_pixels, what)
            seconds = _duration(container, stream)
            if max_seconds is not None and seconds is not None and seconds > max_seconds:
                raise VideoTooLarge(f"{what} lasts {seconds:.1f} s, over the limit of {max_seconds:g} s")
            total, counted = stream.frames, not stream.frames
            if counted:
                total = 0
                for _ in container.decode(stream):
                    total += 1
                    if total > max_frames:
                        break
        if total > max_frames:
            raise VideoTooLarge(f"{what} has {'more than ' if counted else ''}{max_frames if counted else total} "
                                f"frames, over the limit of {max_frames}")
        _check_frame_count(total, what)
        wanted = sample_indices(total, num_frames)
        keep, frames = set(wanted), []
        with av.open(source(), container_options=options) as container:  # second pass: the sampled frames
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    _check_frame_pixels(frame.width, frame.height, max_pixels, what)
                    frames.append(frame.to_image().convert("RGB"))
                if i >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError, OSError, ValueError, EOFError) as e:
        raise UserError(f"{what} cannot be decoded: {_one_line(e)}") from None
    if not frames:
        raise UserError(f"{what} has no frames")
    return frames


def _check_frame_pixels(w: int, h: int, max_pixels: int, what: str) -> None:
    if w * h > max_pixels:
        raise VideoTooLarge(f"{what} is {w}x{h} = {w * h} pixels a frame, over the limit of {max_pixels}")
    _check_pixels((w, h), max_pixels, what)


def _duration(container, stream) -> float | None:
    """Seconds the stream (else the container) declares, or None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # in microseconds (av.time_base)
    return None


def _one_line(e: Exception) -> str:
    """An exception's message on one line (FFmpeg's without the "'<none>'" file name of a stream in memory)."""
    return " ".join(str(getattr(e, "strerror", None) or e).split())[:300]


@dataclass
class VideoProcessor:
    """LLaVA-OneVision video preprocessing with transformers' LlavaOnevisionVideoProcessor
    semantics: frames sampled uniformly (`num_frames`), each resized to exactly `size` (bicubic),
    not cropped, rescaled and normalized (`frames`: an ImageProcessor doing that per frame).
    LLaVA-NeXT-Video's (LlavaNextVideoVideoProcessor) resizes the shortest edge and center-crops
    instead (see next_video_frames). transformers resizes with torchvision on tensors, we with
    PIL, as for the images."""

    frames: ImageProcessor
    num_frames: int = DEFAULT_NUM_FRAMES

    @classmethod
    def from_dir(cls, path: Path, image_processor: ImageProcessor, next_video: bool = False) -> "VideoProcessor":
        """From video_preprocessor_config.json (size, resample, rescale, mean, std, num_frames) if
        the checkpoint has one, else the image processor's per-piece settings and 8 frames.
        `next_video`: LLaVA-NeXT-Video's (see next_video_frames)."""
        file = path / "video_preprocessor_config.json"
        if not file.exists():
            return cls(image_processor)
        d = read_json_object(file, "video processor config")
        tile = image_processor.size_hw or (image_processor.shortest_edge,) * 2
        if next_video:
            return cls._from_config(next_video_frames(d, image_processor), d.get("num_frames"), file)
        size = d.get("size") or {"height": tile[0], "width": tile[1]}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if isinstance(size, dict) and "height" not in size and "shortest_edge" in size:
            size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        d["size"] = size
        d.setdefault("image_mean", list(image_processor.mean or CLIP_MEAN))
        d.setdefault("image_std", list(image_processor.std or CLIP_STD))
        if not d.get("do_center_crop") or not d.get("crop_size"):
            d["do_center_crop"] = False
            d.pop("crop_size", None)
        return cls._from_config(d, d.get("num_frames"), file, tile[0])

    @classmethod
    def _from_config(cls, d: dict, num_frames, file: Path, default_size: int = 336) -> "VideoProcessor":
        try:
            frames = ImageProcessor.from_config(d, default_size)
        except (AttributeError, KeyError, TypeError) as e:
            raise UserError(f"{file} is not a valid video processor config: {e}") from None
        frames.pad_to_square = False
        return cls(frames, check_num_frames(num_frames or DEFAULT_NUM_FRAMES))

    def __call__(self, videos: list[VideoInput], num_frames: int | None = None) -> list[torch.Tensor]:
        """Videos -> each one's pixel values [T, 3, H, W] float32 (T: its sampled frames)."""
        n = self.num_frames if num_frames is None else num_frames
        return [torch.stack([self.frames.one(f) for f in load_video(v, n)]) for v in videos]


def next_video_frames(d: dict, image_processor: ImageProcessor) -> dict:
    """A LLaVA-NeXT-Video video_preprocessor_config.json with its missing keys filled in, as
    transformers' LlavaNextVideoVideoProcessor does per frame: resize the shortest edge (aspect
    ratio kept, `default_to_square` false), center crop, rescale, normalize with CLIP's mean and
    std, bicubic. Its class defaults are 224 pixels; here a missing size or crop is the image
    processor's (the tower's), since frames of another size would not fit the tower."""
    d = dict(d)
    edge = image_processor.shortest_edge or (image_processor.size_hw or (336, 336))[0]
    crop = image_processor.crop_hw or (edge, edge)
    d["size"] = d.get("size") or {"shortest_edge": edge}
    d["crop_size"] = d.get("crop_size") or {"height": crop[0], "width": crop[1]}
    d.setdefault("do_center_crop", True)
    d.setdefault("image_mean", list(CLIP_MEAN))
    d.setdefault("image_std", list(CLIP_STD))
    return d
