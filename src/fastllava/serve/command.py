"""`fastllava serve`: options, then uvicorn running the app."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..cli_args import add_model_args, add_quant_args, load_options, nonnegative_int, positive_int, utf8_text
from ..errors import UserError
from ..extras import require
from .settings import Limits, Settings


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (POST /v1/chat/completions)")
    add_model_args(p)
    add_quant_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", type=utf8_text, help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--served-model-name", type=utf8_text, nargs="+", action="extend", metavar="NAME",
                   help="the `model` name clients use (default: the folder's name); several names (space- or "
                        "comma-separated, or the option repeated) are aliases: the first is the id answers carry, "
                        "all are accepted and listed by /v1/models")
    p.add_argument("--reduce", help="token-reduction spec used when a request does not give one")
    p.add_argument("--speculate", help="speculative decoding for every request: ngram[:n=3,k=4], "
                                       "layerskip[:skip=A-B,k=4] or draft:model=DIR[,k=4,image=0,reduce=SPEC] "
                                       "(greedy answers unchanged; see docs/speculative.md)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests beyond the batch (then 429)")
    p.add_argument("--max-len", type=positive_int, default=4096, help="KV-cache slots per row (capped by the model)")
    p.add_argument("--prefix-cache-mb", type=nonnegative_int, default=Settings.prefix_cache_mb, metavar="MB",
                   help="keys and values of earlier prompts kept, so that a prompt beginning the same way (a chat's "
                        "history, a shared system prompt and image) prefills only the rest; 0: off; not used with "
                        "a reduction or a quantized KV cache (default %(default)s)")
    p.add_argument("--encoder-cache-mb", type=nonnegative_int, default=Settings.encoder_cache_mb, metavar="MB",
                   help="encoded images kept (keyed by their preprocessed pixels), so an image sent again is not "
                        "encoded again; 0: off (default %(default)s)")
    d = Limits()
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes)
    p.add_argument("--max-image-bytes", type=positive_int, default=d.max_image_bytes)
    p.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels)
    p.add_argument("--max-images", type=positive_int, default=d.max_images, help="images per request")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="default: the context")
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens, help="the most a request may generate")
    p.add_argument("--allow-http-images", action="store_true",
                   help="fetch http(s):// image and video URLs (off: refused)")
    p.add_argument("--allow-file-images", metavar="DIR",
                   help="serve file:// image and video URLs from under DIR (off: refused)")
    v = p.add_argument_group("videos (LLaVA-OneVision and LLaVA-NeXT-Video checkpoints)")
    v.add_argument("--num-frames", type=positive_int, metavar="N",
                   help="frames sampled uniformly from each video (default: the checkpoint's video processor's, "
                        "else 8)")
    v.add_argument("--max-videos", type=positive_int, default=d.max_videos, help="videos per request")
    v.add_argument("--max-video-bytes", type=positive_int, default=d.max_video_bytes,
                   help="one encoded video, or the sampled frames of a frame list together")
    v.add_argument("--max-video-frames", type=positive_int, default=d.max_video_frames,
                   help="frames one video may hold before sampling (a video file's, or a frame list's)")
    v.add_argument("--max-video-pixels", type=positive_int, default=d.max_video_pixels,
                   help="width x height of a frame")
    v.add_argument("--max-video-seconds", type=positive_float, default=d.max_video_seconds,
                   help="a video file's duration, when its container declares one")
    p.set_defaults(func=cmd_serve)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def settings_from_args(args: argparse.Namespace, model_dir: Path) -> Settings:
    files = Path(args.allow_file_images).expanduser() if args.allow_file_images else None
    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    max_videos=args.max_videos, max_video_bytes=args.max_video_bytes,
                    max_video_frames=args.max_video_frames, max_video_pixels=args.max_video_pixels,
                    max_video_seconds=args.max_video_seconds)
    names = served_names(args.served_model_name) or [model_dir.name]
    return Settings(model_id=names[0], aliases=tuple(names[1:]), api_key=args.api_key, limits=limits,
                    allow_http_images=args.allow_http_images, file_image_dir=files,
                    max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_len=args.max_len,
                    reduce=args.reduce, speculate=args.speculate, prefix_cache_mb=args.prefix_cache_mb,
                    encoder_cache_mb=args.encoder_cache_mb, num_frames=args.num_frames)


def served_names(values: list[str] | None) -> list[str]:
    """--served-model-name's values (each may be a comma-separated list) as distinct names, in order."""
    names = [n.strip() for v in values or [] for n in v.split(",")]
    if any(not n for n in names):
        raise UserError(f"--served-model-name: an empty name in {','.join(values)!r}")
    return list(dict.fromkeys(names))


def base_url(host: str, port: int) -> str:
    """The server's URL (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_listen(host: str, port: int) -> None:
    """Bind (host, port) as uvicorn will, and let go: an address this machine does not have, a name
    that does not resolve or a port in use is one line before the weights load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing port is free
            sock.bind((host, port))
    except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError; a bad name can be a UnicodeError
        raise UserError(f"cannot listen on --host {host} --port {port}: {getattr(e, 'strerror', None) or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    require("fastapi", "serve", "fastllava serve")  # a missing extra fails before loading weights
    uvicorn = require("uvicorn", "serve", "fastllava serve")

    from .. import load
    from ..generation.speculate import parse_speculate
    from ..images import check_num_frames
    from ..quant.spec import parse_kv_cache
    from ..reduction.runtime import make_reduction
    from .app import create_app

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    check_listen(args.host, args.port)
    served_names(args.served_model_name)  # a bad name fails before loading weights
    if args.allow_file_images and not Path(args.allow_file_images).expanduser().is_dir():
        raise UserError(f"--allow-file-images: {args.allow_file_images} is not a folder")
    if args.num_frames is not None:
        check_num_frames(args.num_frames)
    parse_kv_cache(args.kv_cache)  # a bad spec fails before loading weights
    parse_speculate(args.speculate, None)
    llava = load(args.model, **load_options(args))
    try:
        make_reduction(args.reduce, llava.config)
    except UserError as e:
        raise UserError(f"--reduce: {e}") from None
    settings = settings_from_args(args, llava.path)
    app = create_app(llava, settings)  # checks what needs the model (a speculation's layers and cache)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"fastllava: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    aliases = f" (also as {', '.join(settings.aliases)})" if settings.aliases else ""
    url = base_url(args.host, args.port)
    print(f"fastllava: serving {settings.model_id}{aliases} on {url} (OpenAI base URL {url}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
