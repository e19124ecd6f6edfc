"""Chat-completion requests: JSON body -> a checked `ChatRequest`, or an APIError naming the
parameter at fault (OpenAI's field names and ranges)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..prompts import Conversation, Turn
from .errors import APIError, invalid

# Accepted and ignored (they do not change the answer).
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls", "stream_options"}
# Accepted only at the value that means "off": key -> (its type, the values allowed).
OFF_VALUES = {"n": (int, (1,)), "frequency_penalty": (float, (0,)), "presence_penalty": (float, (0,)),
              "logprobs": (bool, (False,)), "top_logprobs": (int, (0,)), "logit_bias": (dict, ({},)),
              "tools": (list, ([],)), "tool_choice": (object, ("none", "auto")), "functions": (list, ([],)),
              "modalities": (list, (["text"],))}
HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "seed", "stop", "stream", "reduce", "response_format", "ignore_eos"}
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_TEMPERATURE = 100  # as generate (SamplingParams); 0, or below 1e-4, is greedy


@dataclass
class ImageRef:
    url: str
    param: str  # where it stood, e.g. "messages[0].content[1].image_url.url"


@dataclass
class VideoRef:
    """A video part: an encoded video file at `url` (a video_url part), or its frames as image
    URLs (a video part holding a list)."""

    param: str  # where it stood, e.g. "messages[0].content[1].video_url.url"
    url: str | None = None
    frames: list[ImageRef] = field(default_factory=list)


@dataclass
class ChatRequest:
    model: str | None
    prompt: Conversation  # a str: the turns' text (system messages' first), carrying the turns themselves
    images: list[ImageRef]
    max_tokens: int | None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    reduce: str | None = None
    ignore_eos: bool = False  # generate max_tokens whatever comes (for load tests)
    videos: list[VideoRef] = field(default_factory=list)  # in the order they stand (LLaVA-OneVision, NeXT-Video)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the body is not valid JSON: {str(e)[:200]}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the body must be a JSON object, got {_kind(data)}", None, "invalid_type")
    _check_unicode(data)
    return data


def _check_unicode(data) -> None:
    """Refuse a string or key that UTF-8 cannot encode: JSON's escapes allow a lone surrogate
    ("\\ud800"), which the tokenizer and the JSON of an answer refuse."""
    stack = [(data, ())]  # (value, its place: a chain (parent's chain, key or index))
    while stack:
        value, chain = stack.pop()
        bad = isinstance(value, str) and not _utf8(value)
        if isinstance(value, dict):
            bad = not all(_utf8(key) for key in value)
            stack.extend((item, (chain, key)) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, (chain, i)) for i, item in enumerate(value))
        if bad:
            raise invalid("the body is not valid JSON: a string holds a lone surrogate (an escape such as "
                          "\\ud800 without its pair), which is not a character", _param(chain), "invalid_json")


def _utf8(text: str) -> bool:
    if text.isascii():  # at once (a flag of the string): a data: URL is not copied
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _param(chain: tuple) -> str | None:
    keys = []
    while chain:
        chain, key = chain
        keys.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(keys)).removeprefix(".") or None


def parse_chat(d: dict, max_images: int, max_videos: int = 1) -> ChatRequest:
    for key in d:
        if key not in HANDLED | IGNORED | set(OFF_VALUES):
            shown = json.dumps(key[:80], ensure_ascii=False)[1:-1]  # one line: a newline in a key is escaped
            raise invalid(f"unrecognized request argument supplied: {shown}", key[:80], "unknown_parameter")
    for key, (kind, allowed) in OFF_VALUES.items():
        if _get(d, key, kind) is not None and d[key] not in allowed:
            raise invalid(f"{key}={json.dumps(d[key])[:80]} is not supported by this server", key, "unsupported_value")
    fmt = _get(d, "response_format", dict)
    if fmt is not None and fmt.get("type") != "text":
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")
    prompt, images, videos = _messages(d.get("messages"), max_images, max_videos)
    stream = bool(_get(d, "stream", bool))
    options = _get(d, "stream_options", dict)
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    include_usage = options is not None and _get(options, "include_usage", bool, "stream_options.include_usage")
    max_tokens = _get(d, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _get(d, "max_tokens", int)
    name = "max_completion_tokens" if d.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"{name} must be at least 1, got {max_tokens}", name)
    temperature = _number(d, "temperature", 0, MAX_TEMPERATURE, 1.0)
    top_p = _number(d, "top_p", 0, 1, 1.0)  # 0 keeps only the most likely token (greedy)
    top_k = _get(d, "top_k", int) or 0
    if top_k < 0:
        raise invalid(f"top_k must be at least 0, got {top_k}", "top_k")
    seed = _get(d, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise invalid(f"seed must be in [0, 2**63), got {seed}", "seed")
    return ChatRequest(model=_get(d, "model", str), prompt=prompt, images=images, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=_stops(d),
                       stream=stream, include_usage=bool(include_usage), reduce=_get(d, "reduce", str),
                       ignore_eos=bool(_get(d, "ignore_eos", bool)), videos=videos)


def _messages(messages, max_images: int, max_videos: int) -> tuple[Conversation, list[ImageRef], list[VideoRef]]:
    """The conversation, images and videos of a request: user and assistant turns (images and
    videos in user turns), ending with a user turn. The system (and developer) messages' text goes
    first in the first user turn, wherever they stand (LLaVA has no system turn); consecutive
    messages of one role make one turn (texts joined by newlines, images then videos before the
    text)."""
    if not isinstance(messages, list) or not messages:
        what = "nothing" if messages is None else "an empty array" if messages == [] else _kind(messages)
        raise invalid(f"messages must be a non-empty array of messages, got {what}", "messages")
    system, turns, images, videos = [], [], [], []  # turns: [role, texts, image count, where it started, videos]
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object, got {_kind(m)}", where, "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            what = "tool messages (and tool calls) are not supported" if role == "tool" else \
                f"got {json.dumps(role)[:40]}"
            raise invalid(f"{where}.role must be system, developer, user or assistant; {what}", f"{where}.role",
                          "unsupported_value" if role == "tool" else "invalid_value")
        if role == "assistant" and m.get("tool_calls"):
            raise invalid(f"{where}: tool calls are not supported", f"{where}.tool_calls", "unsupported_value")
        text, refs, clips = _content(m.get("content"), f"{where}.content", allow_images=role == "user")
        if role in ("system", "developer"):
            system.append(text)
            continue
        if not turns and role == "assistant":
            raise invalid(f"{where}: the conversation must start with a user message (after any system "
                          "messages), not an assistant one", f"{where}.role", "invalid_value")
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
            turns[-1][2] += len(refs)
            turns[-1][4] += len(clips)
        else:
            turns.append([role, [text], len(refs), where, len(clips)])
        images += refs
        videos += clips
    if not turns:
        raise invalid("messages must hold a user message", "messages")
    if turns[-1][0] != "user":
        raise invalid("the last message must be a user message (the model answers it); continuing an "
                      "assistant message is not supported", f"{turns[-1][3]}.role", "unsupported_value")
    if len(images) > max_images:
        raise invalid(f"{len(images)} images in the request; at most {max_images} are allowed",
                      "messages", "too_many_images")
    if len(videos) > max_videos:
        raise invalid(f"{len(videos)} videos in the request; at most {max_videos} are allowed", "messages",
                      "too_many_videos")
    turns[0][1][:0] = system
    return (Conversation([Turn(role, "\n".join(t for t in texts if t), n, v) for role, texts, n, _, v in turns]),
            images, videos)


def _content(content, where: str, allow_images: bool) -> tuple[str, list[ImageRef], list[VideoRef]]:
    """A message's text (its text parts joined by newlines), image URLs and videos: a video_url
    part (an encoded video file) or a video part (a list of frame image URLs)."""
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list) or not content:
        raise invalid(f"{where} must be a string or a non-empty array of parts, got {_kind(content)}",
                      where, "invalid_type")
    texts, images, videos = [], [], []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"{p} must be an object, got {_kind(part)}", p, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            texts.append(_get(part, "text", str, f"{p}.text", required=True))
        elif kind == "image_url" and allow_images:
            ref = _get(part, "image_url", dict, f"{p}.image_url", required=True)
            images.append(ImageRef(_get(ref, "url", str, f"{p}.image_url.url", required=True), f"{p}.image_url.url"))
        elif kind == "video_url" and allow_images:
            ref = _get(part, "video_url", dict, f"{p}.video_url", required=True)
            url = _get(ref, "url", str, f"{p}.video_url.url", required=True)
            videos.append(VideoRef(f"{p}.video_url.url", url=url))
        elif kind == "video" and allow_images:
            frames = _get(part, "video", list, f"{p}.video", required=True)
            if not frames or not all(isinstance(f, str) for f in frames):
                raise invalid(f"{p}.video must be a non-empty array of frame image URLs", f"{p}.video", "invalid_type")
            videos.append(VideoRef(f"{p}.video", frames=[ImageRef(f, f"{p}.video[{k}]") for k, f in enumerate(frames)]))
        elif kind in ("image_url", "video_url", "video"):
            what = "images" if kind == "image_url" else "videos"
            raise invalid(f"{p}: {what} are only allowed in user messages", p, "unsupported_value")
        else:
            raise invalid(f"{p}.type must be text, image_url, video_url or video, got {json.dumps(kind)[:40]}",
                          f"{p}.type", "unsupported_value")
    return "\n".join(texts), images, videos


def _stops(d: dict) -> list[str]:
    stop = d.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or an array of them", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"at most {MAX_STOPS} stop strings of {MAX_STOP_CHARS} characters are allowed", "stop")
    return stops


def _number(d: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = _get(d, key, float)
    if value is None:
        return default
    if not math.isfinite(value):  # JSON's NaN and Infinity, or a number past a double's range (1e400)
        raise invalid(f"{key} must be a finite number, got {json.dumps(value)}", key)
    if not lo <= value <= hi:
        raise invalid(f"{key} must be in [{lo}, {hi}], got {json.dumps(value)[:40]}", key)
    return float(value)


def _get(d: dict, key: str, kind: type, param: str | None = None, required: bool = False):
    """d[key] checked to be of `kind` (bools are not ints; a float is any number); None when absent
    unless required."""
    value = d.get(key)
    param = param or key
    if value is None:
        if required:
            raise invalid(f"{param} is required", param, "missing_required_parameter")
        return None
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (kind in (int, float) and isinstance(value, bool)):
        raise invalid(f"{param} must be {_NAMES[kind]}, got {_kind(value)}", param, "invalid_type")
    return value


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
          list: "an array"}


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def check_model(name: str | None, served: str | Sequence[str]) -> None:
    """404 unless `name` is None or one of the served names (a name, or several: the first is the
    model's id, the others aliases)."""
    names = (served,) if isinstance(served, str) else tuple(served)
    if name is not None and name not in names:
        listed = " or ".join(repr(n) for n in names)
        raise APIError(404, f"the model {name[:200]!r} does not exist; this server serves {listed}", "model",
                       "model_not_found")
