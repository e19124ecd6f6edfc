"""Image URLs of a request -> PIL images: data: URLs always; http(s):// and file:// only when
the operator allowed them. Every refusal is an APIError naming the part at fault."""

from __future__ import annotations

import base64
import binascii
import http.client
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
from ..images import load_image
from .errors import APIError, invalid, too_large
from .protocol import ImageRef
from .settings import Settings

FETCH_TIMEOUT_S = 10  # the whole download of one http(s):// image


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
    """The bytes at an http(s):// URL, within the byte limit and FETCH_TIMEOUT_S seconds for the
    whole download (connecting, redirects, headers, body): a server that sends a byte now and then
    cannot hold an image-preparation slot for longer."""
    deadline = _Deadline(FETCH_TIMEOUT_S)
    try:
        with deadline, deadline.opener().open(ref.url) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit():
                _check_size(int(declared), limit, ref.param)
            data = response.read(limit + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if not deadline.expired:
            raise invalid(f"cannot fetch the image: {str(e)[:200]}", ref.param, "image_fetch_failed") from None
    if deadline.expired:  # the sockets were shut down: an error above, or a body cut short
        raise invalid(f"fetching the image took over {FETCH_TIMEOUT_S} s", ref.param, "image_fetch_timeout")
    _check_size(len(data), limit, ref.param)
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


def _file(ref: ImageRef, root: Path, limit: int) -> bytes:
    try:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(ref.url).path)).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise invalid("file:// image URLs must name an existing file under the served folder", ref.param,
                          "url_not_allowed")
        _check_size(path.stat().st_size, limit, ref.param)
        return path.read_bytes()
    except (OSError, ValueError) as e:  # a NUL in the path, a file that cannot be read
        raise invalid(f"cannot read the file: {str(e)[:200]}", ref.param, "invalid_image_url") from None


def _check_size(n: int, limit: int, param: str) -> None:
    if n > limit:
        raise too_large(f"the image is {n} bytes, over the limit of {limit}", param, "image_too_large")


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
