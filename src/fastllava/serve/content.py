"""Image URLs of a request -> PIL images: data: URLs always; http(s):// and file:// only when
the operator allowed them. Every refusal is an APIError naming the part at fault."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import load_image
from .errors import APIError, invalid, too_large
from .protocol import ImageRef
from .settings import Settings

FETCH_TIMEOUT_S = 10


def load_images(refs: list[ImageRef], settings: Settings) -> list[Image.Image]:
    return [decode_image(image_bytes(ref, settings), ref.param, settings.limits.max_image_pixels) for ref in refs]


def image_bytes(ref: ImageRef, settings: Settings) -> bytes:
    """The encoded image a URL points to, within the byte limit."""
    url, limit = ref.url, settings.limits.max_image_bytes
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(ref, limit)
    if scheme in ("http", "https"):
        if not settings.allow_http_images:
            raise invalid(f"{scheme}:// image URLs are not allowed on this server (start it with "
                          "--allow-http-images); send the image as a data: URL", ref.param, "url_not_allowed")
        return _fetch(ref, limit)
    if scheme == "file":
        if settings.file_image_dir is None:
            raise invalid("file:// image URLs are not allowed on this server (start it with --allow-file-images DIR)",
                          ref.param, "url_not_allowed")
        return _file(ref, settings.file_image_dir, limit)
    raise invalid(f"unsupported image URL {url[:40]!r}: give a data:image/...;base64, URL", ref.param, "invalid_image_url")


def _data_url(ref: ImageRef, limit: int) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise invalid("a data: image URL must look like data:image/png;base64,<data>", ref.param, "invalid_image_url")
    media = head[5:-7].lower()
    if media and not media.startswith("image/"):
        raise invalid(f"the data: URL holds {media!r}, not an image", ref.param, "invalid_image_url")
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise too_large(f"the image is over the limit of {limit} bytes", ref.param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the data: URL is not valid base64", ref.param, "invalid_base64") from None
    _check_size(len(data), limit, ref.param)
    return data


def _fetch(ref: ImageRef, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(ref.url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (operator opted in)
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise invalid(f"cannot fetch the image: {str(e)[:200]}", ref.param, "image_fetch_failed") from None
    _check_size(len(data), limit, ref.param)
    return data


def _file(ref: ImageRef, root: Path, limit: int) -> bytes:
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(ref.url).path)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise invalid("file:// image URLs must name an existing file under the served folder", ref.param,
                      "url_not_allowed")
    _check_size(path.stat().st_size, limit, ref.param)
    return path.read_bytes()


def _check_size(n: int, limit: int, param: str) -> None:
    if n > limit:
        raise too_large(f"the image is {n} bytes, over the limit of {limit}", param, "image_too_large")


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Refuse too many pixels (413) from the header alone, then decode (422 when it cannot be, or
    load_image refuses it: sides more than images.MAX_ASPECT-fold apart)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError as e:
        raise too_large(f"the image is too large: {e}", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(422, "the image data is not an image PIL can read", param, "invalid_image") from None
    if w * h > max_pixels:
        raise too_large(f"the image is {w}x{h} pixels, over the limit of {max_pixels}", param, "image_too_large")
    try:
        return load_image(data, max_pixels)
    except UserError as e:
        raise APIError(422, str(e), param, "invalid_image") from None
