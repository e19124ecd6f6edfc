"""What an operator sets when starting the server: identity, access, limits, batching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Limits:
    max_body_bytes: int = 32 * 2**20  # the whole request body
    max_image_bytes: int = 16 * 2**20  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height of one image (decompression bombs)
    max_images: int = 4  # images in one request
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 2048  # the most a request may ask to generate (capped by the context)
    default_max_tokens: int = 256  # when a request does not say (capped by what fits)
    # videos (LLaVA-OneVision, LLaVA-NeXT-Video checkpoints)
    max_videos: int = 1  # videos in one request
    max_video_bytes: int = 24 * 2**20  # one encoded video, or the frames of a frame list together
    max_video_frames: int = 18_000  # frames in one video (a file's, or a frame list's); sampled to num_frames
    max_video_pixels: int = 3840 * 2160  # width x height of one frame
    max_video_seconds: float = 600.0  # a video file's duration, when its container declares one


@dataclass
class Settings:
    model_id: str  # the name clients pass as `model` (and the one answers carry)
    api_key: str | None = None  # None: no authentication
    limits: Limits = None  # type: ignore[assignment]
    allow_http_images: bool = False  # fetch http(s):// image (and video) URLs
    file_image_dir: Path | None = None  # serve file:// image (and video) URLs from under this folder only
    max_batch_size: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row beyond the batch; more are answered 429
    max_len: int = 4096  # KV-cache slots (capped by the model's max_position_embeddings)
    reduce: str | None = None  # the default token-reduction spec
    speculate: str | None = None  # speculative decoding for every request (fastllava.generation.speculate)
    aliases: tuple[str, ...] = ()  # more names accepted as `model` (and listed by /v1/models)
    prefix_cache_mb: int = 1024  # keys and values of earlier prompts kept for reuse (0: no prefix cache)
    encoder_cache_mb: int = 256  # encoded images kept for reuse (0: no encoder cache)
    num_frames: int | None = None  # frames sampled from each video (None: the checkpoint's video processor's)

    def __post_init__(self):
        if self.limits is None:
            self.limits = Limits()
        self.aliases = tuple(a for a in dict.fromkeys(self.aliases) if a != self.model_id)

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name a request's `model` may give: model_id first, then the aliases."""
        return (self.model_id, *self.aliases)
