"""Image and video URLs of a request -> PIL images (a video: its sampled frames): data: URLs
always; http(s):// and file:// only when the operator allowed them. Every refusal is an APIError
naming the part at fault."""

from __future__ import annotations

import base64
import binascii
import http.client
import importlib.util
import io
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import VideoTooLarge, load_image, load_video_bytes, sample_indices
from .errors import APIError, invalid, too_large
from .protocol import ImageRef, VideoRef
from .settings import Settings

FETCH_TIMEOUT_S = 10  # the whole download of one http(s):// image


def image_bytes(ref: ImageRef, settings: Settings, limit: int | None = None) -> bytes:
    """The encoded image a URL points to, within the byte limit (default: --max-image-bytes)."""
    return url_bytes(ref, settings, settings.limits.max_image_bytes if limit is None else limit, "image")


def url_bytes(ref: ImageRef, settings: Settings, limit: int, kind: str) -> bytes:
    """The bytes a URL of an image or a video (`kind`) points to, within `limit` bytes; the error
    codes name the kind (image_too_large, invalid_video_url, ...)."""
    url = ref.url
    example = "data:image/png;base64," if kind == "image" else "data:video/mp4;base64,"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(ref, limit, kind, example)
    if scheme in ("http", "https"):
        if not settings.allow_http_images:
            raise invalid(f"{scheme}:// {kind} URLs are not allowed on this server (start it with "
                          f"--allow-http-images); send the {kind} as a data: URL", ref.param, "url_not_allowed")
        return _fetch(ref, limit, kind)
    if scheme == "file":
        if settings.file_image_dir is None:
            raise invalid(f"file:// {kind} URLs are not allowed on this server (start it with --allow-file-images DIR)",
                          ref.param, "url_not_allowed")
        return _file(ref, settings.file_image_dir, limit, kind)
    raise invalid(f"unsupported {kind} URL {url[:40]!r}: give a {example} URL", ref.param, f"invalid_{kind}_url")


def _data_url(ref: ImageRef, limit: int, kind: str, example: str) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise invalid(f"a data: {kind} URL must look like {example}<data>", ref.param, f"invalid_{kind}_url")
    media = head[5:-7].lower()
    if media and not media.startswith(f"{kind}/") and not (kind == "video" and media == "application/octet-stream"):
        raise invalid(f"the data: URL holds {media!r}, not {'an image' if kind == 'image' else 'a video'}", ref.param,
                      f"invalid_{kind}_url")
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise too_large(f"the {kind} is over the limit of {limit} bytes", ref.param, f"{kind}_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the data: URL is not valid base64", ref.param, "invalid_base64") from None
    _check_size(len(data), limit, ref.param, kind)
    return data


def _fetch(ref: ImageRef, limit: int, kind: str = "image") -> bytes:
    """The bytes at an http(s):// URL, within the byte limit and FETCH_TIMEOUT_S seconds for the
    whole download (connecting, redirects, headers, body): a server that sends a byte now and then
    cannot hold an image-preparation slot for longer."""
    deadline = _Deadline(FETCH_TIMEOUT_S)
    try:
        with deadline, deadline.opener().open(ref.url) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit():
                _check_size(int(declared), limit, ref.param, kind)
            data = response.read(limit + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if not deadline.expired:
            raise invalid(f"cannot fetch the {kind}: {str(e)[:200]}", ref.param, f"{kind}_fetch_failed") from None
    if deadline.expired:  # the sockets were shut down: an error above, or a body cut short
        raise invalid(f"fetching the {kind} took over {FETCH_TIMEOUT_S} s", ref.param, f"{kind}_fetch_timeout")
    _check_size(len(data), limit, ref.param, kind)
    return data


class _Deadline:
    """Shuts down the sockets of one download when `seconds` have passed (from `with`), which ends
    any read waiting on them; each connection gets the time left as its connect timeout."""

    def __init__(self, seconds: float):
        self.end, self.expired, self.sockets = time.monotonic() + seconds, False, []
        self.timer = threading.Timer(seconds, self._expire)

    def opener(self) -> urllib.request.OpenerDirector:
        """http(s) with redirects between them, and nothing else (no ftp:// or file:// redirects)."""
        opener = urllib.request.OpenerDirector()
        r = urllib.request
        for handler in (r.ProxyHandler(), _HTTP(self), _HTTPS(self), r.HTTPRedirectHandler(), r.HTTPErrorProcessor(),
                        r.HTTPDefaultErrorHandler(), r.UnknownHandler()):
            opener.add_handler(handler)
        return opener

    def connection(self, http_class):
        """http_class (an http.client connection) whose sockets are watched."""
        def make(host, timeout=None, **kwargs):
            if self.expired:
                raise TimeoutError("the deadline has passed")
            conn = http_class(host, timeout=max(self.end - time.monotonic(), 0.01), **kwargs)
            connect = conn.connect

            def watched_connect():  # urllib drops conn.sock once the headers are in: keep our own
                connect()
                self.sockets.append(conn.sock)
            conn.connect = watched_connect
            return conn
        return make

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
            except OSError:  # already closed
                pass

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


class _Watched:
    """An http(s) handler whose connections a _Deadline watches."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.deadline.connection(http_class), req, **kwargs)


class _HTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _HTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def _file(ref: ImageRef, root: Path, limit: int, kind: str = "image") -> bytes:
    try:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(ref.url).path)).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise invalid(f"file:// {kind} URLs must name an existing file under the served folder", ref.param,
                          "url_not_allowed")
        _check_size(path.stat().st_size, limit, ref.param, kind)
        return path.read_bytes()
    except (OSError, ValueError) as e:  # a NUL in the path, a file that cannot be read
        raise invalid(f"cannot read the file: {str(e)[:200]}", ref.param, f"invalid_{kind}_url") from None


def _check_size(n: int, limit: int, param: str, kind: str = "image") -> None:
    if n > limit:
        raise too_large(f"the {kind} is {n} bytes, over the limit of {limit}", param, f"{kind}_too_large")


def image_size(data: bytes, param: str, max_pixels: int) -> tuple[int, int]:
    """(height, width) of an encoded image from its header alone (nothing decoded): 422 when PIL
    cannot read it, 413 for too many pixels."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError as e:
        raise too_large(f"the image is too large: {e}", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(422, "the image data is not an image PIL can read", param, "invalid_image") from None
    if w * h > max_pixels:
        raise too_large(f"the image is {w}x{h} pixels, over the limit of {max_pixels}", param, "image_too_large")
    return h, w


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Check the header (image_size), then decode (422 when it cannot be, or load_image refuses
    it: sides more than images.MAX_ASPECT-fold apart)."""
    image_size(data, param, max_pixels)
    try:
        return load_image(data, max_pixels)
    except UserError as e:
        raise APIError(422, str(e), param, "invalid_image") from None


def video_frames(ref: VideoRef, settings: Settings, num_frames: int) -> list[Image.Image]:
    """The frames of a video part sampled uniformly to at most `num_frames` (images.sample_indices,
    as the Python API samples), within the video limits: an encoded video file (decoded with PyAV;
    413 over the bytes, pixels a frame, frames or duration limit, 422 when it does not decode), or
    a list of frame image URLs, of which only the sampled ones are read and decoded."""
    limits = settings.limits
    if ref.url is None:
        n = len(ref.frames)
        if n > limits.max_video_frames:
            raise too_large(f"the video has {n} frames, over the limit of {limits.max_video_frames}", ref.param,
                            "video_too_large")
        picked = [ref.frames[i] for i in sample_indices(n, num_frames)]
        encoded, total = [], 0
        for frame in picked:
            encoded.append(image_bytes(frame, settings))
            total += len(encoded[-1])
            if total > limits.max_video_bytes:
                raise too_large(f"the video's frames are over the limit of {limits.max_video_bytes} bytes", ref.param,
                                "video_too_large")
        return [decode_image(data, frame.param, limits.max_video_pixels) for data, frame in zip(encoded, picked)]
    data = url_bytes(ImageRef(ref.url, ref.param), settings, limits.max_video_bytes, "video")
    if importlib.util.find_spec("av") is None:
        raise invalid("this server cannot read video files (PyAV is not installed: pip install 'fastllava[video]'); "
                      "send the video as a list of frame images", ref.param, "unsupported_video")
    try:
        return load_video_bytes(data, num_frames, limits.max_video_pixels, limits.max_video_frames,
                                limits.max_video_seconds, "the video")
    except VideoTooLarge as e:
        raise too_large(str(e), ref.param, "video_too_large") from None
    except UserError as e:  # not a video, corrupt, truncated, no frames
        raise APIError(422, str(e), ref.param, "invalid_video") from None
