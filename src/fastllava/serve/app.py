"""The ASGI app: routes, API-key check, body limit, request -> job -> response (JSON or SSE).
Every refusal is an OpenAI error object with its status; the model runs on the scheduler's thread."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..engine import Llava
from ..errors import UserError
from ..generation import SamplingParams
from ..generation.encoder_cache import EncoderCache, pixel_digest
from ..generation.speculate import parse_speculate
from .content import decode_image, image_bytes, image_size, video_frames
from .errors import APIError, invalid
from .prefix_cache import PrefixCache, token_keys
from .protocol import ChatRequest, check_model, parse_chat, parse_json
from .reduce import check_reduce
from .responses import DONE, Completion, model_card, model_list, sse
from .scheduler import Busy, Job, Scheduler
from .settings import Settings

PREPARE_AT_ONCE = 4  # requests whose images are decoded at the same time (bounds their memory)
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")  # counted by name; others as "other"
CHARS_PER_TOKEN = 64  # prompt text refused, before tokenizing, past this many characters per token of context


def create_app(llava: Llava, settings: Settings) -> FastAPI:
    if llava.prompts is None:
        raise UserError("this checkpoint has no tokenizer.json, so it cannot serve chat requests")
    ctx = min(settings.max_len, llava.config.text.max_position_embeddings)
    speculate = parse_speculate(settings.speculate, llava.config.text.num_hidden_layers)
    llava.runner.encoder_cache = EncoderCache(settings.encoder_cache_mb * 2**20) if settings.encoder_cache_mb else None
    prefix = None
    if settings.prefix_cache_mb and llava.runner.kv_cache is None:  # quantized caches are not shared (prefix_cache)
        prefix = PrefixCache(settings.prefix_cache_mb * 2**20, f"{llava.path}|{llava.weights}|{llava.model.dtype}")
    drafter = llava.drafter(speculate) if speculate is not None else None  # a draft model, loaded once
    scheduler = Scheduler(llava, settings.max_batch_size, settings.max_queue, ctx, speculate, prefix, drafter)
    created = int(time.time())
    preparing = asyncio.Semaphore(PREPARE_AT_ONCE)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="fastllava", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                                     code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return JSONResponse(APIError(500, "internal error", None, "internal_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", None, "missing_api_key")
        if not hmac.compare_digest(given[7:].strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

    app.add_middleware(CountAnswers, metrics=scheduler.metrics)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(scheduler.gauges(), scheduler.cache_counters()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.alive else "down", "model": settings.model_id, **scheduler.counts()}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return model_list(settings.served_names, created)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name, settings.served_names)
        return model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await _read_body(request, settings.limits.max_body_bytes)
        req = await run_in_threadpool(_parse, body, settings, ctx)  # a large body parses off the event loop
        check_model(req.model, settings.served_names)
        reduce = req.reduce or settings.reduce
        check_reduce(reduce, llava.config)  # the spec; each image's budget once it is decoded (_prepare)
        _busy(scheduler.check_room)  # before decoding images: a flood is refused cheaply
        async with preparing:
            ids, pixel_values, image_sizes, params, keys, videos = await run_in_threadpool(
                _prepare, llava, settings, scheduler, req, reduce)
        info = Completion(settings.model_id, len(ids), ids.count(llava.config.image_token_index),
                          ids.count(llava.config.video_token_index) if videos else 0)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:  # called on the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed
                pass

        job = Job(ids, pixel_values, image_sizes, params, req.stream, emit, reduce, keys, req.ignore_eos,
                  videos=videos)
        _busy(scheduler.submit, job)
        if req.stream:
            return StreamingResponse(_stream(events, job, scheduler, info, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(info.message(await _result(events, job, scheduler, request)))

    return app


class CountAnswers:
    """ASGI middleware: counts each HTTP answer by route and status in `metrics.requests` (reading
    the status as it is sent, so streaming and disconnect detection are untouched)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting(message):
            if message["type"] == "http.response.start":
                self.metrics.requests[(route, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting)


def _busy(fn, *args) -> None:
    try:
        fn(*args)
    except Busy as e:
        raise APIError(e.status, str(e), None, "server_busy" if e.status == 429 else "shutting_down") from None


def _parse(body: bytes, settings: Settings, ctx: int) -> ChatRequest:
    """The request in a body, its text bounded before anything tokenizes it (on a worker thread)."""
    req = parse_chat(parse_json(body), settings.limits.max_images, settings.limits.max_videos)
    most = CHARS_PER_TOKEN * ctx
    if len(req.prompt) > most:
        raise invalid(f"the prompt is {len(req.prompt)} characters, over the limit of {most} ({CHARS_PER_TOKEN} per "
                      f"token of the {ctx}-token context)", "messages", "context_length_exceeded")
    return req


def _prepare(llava: Llava, settings: Settings, scheduler: Scheduler, req: ChatRequest, reduce: str | None):
    """Prompt ids, pixel values, image sizes (LLaVA-NeXT), sampling parameters, the prompt's
    token keys for the prefix cache (None without one or with a video) and the videos' pixel
    values (a list of [T_i, 3, H, W], or None) of a request, within the limits (on a worker thread)."""
    limits, ctx = settings.limits, scheduler.context
    max_pixels = limits.max_image_pixels
    if req.videos:
        _check_videos(llava, req)
    encoded = [image_bytes(ref, settings) for ref in req.images]
    sizes = [image_size(data, ref.param, max_pixels) for data, ref in zip(encoded, req.images)]  # headers only
    image_tokens = [llava.config.image_tokens(h, w) for h, w in sizes]  # one count per image
    check_reduce(reduce, llava.config, image_tokens, len(req.videos), server_default=not req.reduce)
    # a video's token count is its sampled frames': they are read (within the video limits) before tokenizing
    num_frames = settings.num_frames or (llava.video_processor.num_frames if req.videos else 0)
    clips = [video_frames(ref, settings, num_frames) for ref in req.videos]
    video_tokens = [llava.config.video_tokens(len(frames)) for frames in clips]
    try:
        ids = llava.prompts.prompt_ids(req.prompt, len(encoded), image_tokens, video_tokens)
    except UserError as e:
        raise invalid(str(e), "messages", "invalid_prompt") from None
    t = len(ids)
    max_prompt = min(limits.max_prompt_tokens or ctx, ctx - 1)
    if t > max_prompt:
        raise invalid(f"the prompt is {t} tokens (images included), over the limit of {max_prompt}", "messages",
                      "context_length_exceeded")
    if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
        raise invalid(f"max_tokens is {req.max_tokens}, over the limit of {limits.max_tokens}", "max_tokens")
    # max_tokens is clamped to what fits: the context's positions and the cache slots the prefill's
    # layout leaves (the admission's arithmetic, scheduler.admissible); the answer then ends "length"
    room = min(ctx - t, scheduler.cache.max_len - scheduler.slots_needed(t, 1) + 1)
    if room < 1:
        raise invalid(f"the prompt ({t} tokens, images included) leaves no room for an answer in the context of "
                      f"{ctx} tokens", "messages", "context_length_exceeded")
    max_tokens = min(req.max_tokens or limits.default_max_tokens, room)
    try:
        params = SamplingParams(max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.stop).validate()
    except UserError as e:
        raise invalid(str(e), None) from None
    # only now, with every limit checked, are the images decoded
    images = [decode_image(data, ref.param, max_pixels) for data, ref in zip(encoded, req.images)]
    try:
        pixel_values, image_sizes, digests = _pixels(llava, images) if images else (None, None, [])
    except UserError as e:  # preprocessing would make an image over its limit
        raise APIError(422, str(e), "messages", "invalid_image") from None
    videos = None
    if clips:
        try:
            videos = llava.video_processor(clips, num_frames)  # each [T_i, 3, H, W]
        except UserError as e:  # a frame preprocessing refuses (sides more than 100:1)
            raise APIError(422, str(e), req.videos[0].param, "invalid_video") from None
    keys = None
    if scheduler.prefix is not None and reduce is None:
        keys = token_keys(ids, llava.config.image_token_index, digests, image_tokens, llava.config.video_token_index,
                          [pixel_digest(v) for v in videos or []], video_tokens)
    return ids, pixel_values, image_sizes, params, keys, videos


def _check_videos(llava: Llava, req: ChatRequest) -> None:
    """400 for a video sent to a checkpoint that takes none (before any video is read)."""
    if not llava.config.takes_videos or llava.video_processor is None:
        raise invalid(f"this checkpoint (model_type {llava.config.model_type!r}) takes no videos; LLaVA-OneVision "
                      "and LLaVA-NeXT-Video checkpoints do", req.videos[0].param, "unsupported_value")


def _pixels(llava: Llava, images: list) -> tuple[torch.Tensor, torch.Tensor | None, list[bytes]]:
    """(pixel_values [N, 3, H, W], None), or on LLaVA-NeXT (every image's thumbnail and tiles one
    after another [ΣP, 3, H, W], image_sizes [N, 2]): requests batched at prefill concatenate both;
    then a digest of each image as preprocessed (its pixels, and its size on LLaVA-NeXT)."""
    if not llava.config.is_next:
        pixel_values = llava.processor(images)
        return pixel_values, None, [pixel_digest(p) for p in pixel_values]
    tiles, image_sizes = llava.processor.tiles(images)
    digests = [pixel_digest(t) + repr(size).encode() for t, size in zip(tiles, image_sizes.tolist())]
    return torch.cat(tiles), image_sizes, digests


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes, over the limit of {limit}", None, "body_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the body is over the limit of {limit} bytes", None, "body_too_large")
        parts.append(part)
    return b"".join(parts)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result(events: asyncio.Queue, job: Job, scheduler: Scheduler, request: Request):
    """The job's Finish; if the client disconnects first, the job is cancelled."""
    gone = asyncio.ensure_future(_disconnected(request))
    got = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({gone, got}, return_when=asyncio.FIRST_COMPLETED)
        if not got.done():
            scheduler.cancel(job)
            raise APIError(499, "the client closed the request", None, "client_disconnected")  # nobody reads it
        kind, value = got.result()
        if kind == "error":
            raise value
        return value
    finally:
        gone.cancel()
        got.cancel()


async def _stream(events: asyncio.Queue, job: Job, scheduler: Scheduler, info: Completion, include_usage: bool):
    """SSE: a role chunk, content chunks, the finish chunk, the usage chunk if asked, [DONE]."""
    try:
        yield info.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield info.chunk({"content": value})
                continue
            if kind == "done":
                yield info.chunk({}, value.finish_reason)
                if include_usage:
                    yield info.usage_chunk(value)
            else:
                yield sse(value.body())
            yield DONE
            return
    finally:
        scheduler.cancel(job)  # frees the row if the client left early; harmless when finished
