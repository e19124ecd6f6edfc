"""The user-facing model: `fastllava.load(path)` returns a `Llava` that generates text from
images and prompts, streams it, and exposes transformers-shaped low-level calls for tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .assets import resolve_model_path
from .checkpoint import load_model, resolve_device
from .errors import UserError
from .generation import (Runner, SamplingParams, StepTimes, TextState, check_decode_mode, check_left_padded,
                         decode_steps, visible_text)
from .generation.draft_model import ModelDrafter, check_draft
from .generation.speculate import SpecStats, Speculation, parse_speculate, speculative_steps
from .images import (AnyresProcessor, ImageInput, ImageProcessor, OnevisionProcessor, VideoInput, VideoProcessor,
                     check_num_frames)
from .models.llava import LlavaModel
from .ops import left_pad
from .prompts import PromptEncoder
from .reduction.accounting import prefill_stats
from .reduction.runtime import check_videos, make_reduction
from .quant.spec import parse_kv_cache, parse_weights
from .quant.weights import quantize_weights


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict = field(default_factory=dict)


class Llava:
    """A loaded model with its processor, prompt encoder and Runner (decode mode, KV-cache layout,
    compiled callables); `weights` is the weight quantization applied (None: none)."""

    def __init__(self, model: LlavaModel, processor: ImageProcessor | AnyresProcessor, prompts: PromptEncoder | None,
                 path: Path | None = None, runner: Runner | None = None, weights=None,
                 video_processor: VideoProcessor | None = None):
        self.model = model
        self.processor = processor
        self.video_processor = video_processor  # LLaVA-OneVision; None: the checkpoint takes no videos
        self.prompts = prompts
        self.path = path
        self.runner = runner or Runner(model)
        self.weights = weights
        self._drafts: dict[Path, LlavaModel] = {}  # draft models of `draft` speculation, by folder

    @property
    def decode(self) -> str:
        """The decode mode: eager, static or compiled (see fastllava.generation.runner)."""
        return self.runner.decode

    def set_decode(self, mode: str) -> None:
        """Switch the decode mode on the same weights (a new Runner: compiled callables start afresh)."""
        runner = Runner(self.model, check_decode_mode(mode), self.runner.kv_cache)
        runner.encoder_cache = self.runner.encoder_cache
        self.runner = runner

    @property
    def config(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- low-level calls mirroring LlavaForConditionalGeneration ----

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, reduce=None,
               image_sizes: torch.Tensor | None = None, pixel_values_videos=None) -> torch.Tensor:
        """Logits [B, T, V] as `LlavaForConditionalGeneration.forward` returns them: input_ids
        [B, T] already hold one image token per visual feature; positions default to 0..T-1
        like transformers' forward (pass position_ids to count real tokens only). With `reduce`
        (a spec, Method or Reduction) T is the sequence left after the reduction's last cut.
        LLaVA-NeXT takes pixel_values [N, P, C, H, W] and image_sizes [N, 2] as
        `LlavaNextForConditionalGeneration.forward` does; LLaVA-OneVision also pixel_values_videos
        [V, F, 3, H, W] (or a list of [F_i, 3, H, W]) for its video tokens."""
        self._check_videos(pixel_values_videos)
        device = self.device
        input_ids = input_ids.to(device)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        reduction = make_reduction(reduce, self.config)
        pixels = pixel_values.to(device) if pixel_values is not None else None
        return self.runner.logits(input_ids, pixels, valid, position_ids.to(device), reduction, image_sizes,
                                  pixel_values_videos).float()

    def generate_ids(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                     eos_token_id: int | list[int] | None = -1, reduce=None, image_sizes: torch.Tensor | None = None,
                     speculate=None, pixel_values_videos=None, **sampling) -> torch.Tensor:
        """New token ids [B, N] (greedy unless sampling is asked for). Rows that end early are
        padded with the pad id after their EOS, as transformers does. eos_token_id=-1 uses the
        config's; None never stops early. `reduce`: a visual token reduction spec, Method or
        Reduction (whose trace is then filled in). `image_sizes`: as for logits (LLaVA-NeXT).
        `speculate`: a speculative decoding spec (see fastllava.generation.speculate).
        `pixel_values_videos`: as for logits (LLaVA-OneVision)."""
        self._check_videos(pixel_values_videos)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_left_padded(attention_mask)
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling).validate()
        spec = parse_speculate(speculate, self.config.text.num_hidden_layers)
        self.check_context(int(attention_mask.sum(1).max()), params.max_new_tokens)
        eos = self._eos_ids(eos_token_id)
        b = input_ids.shape[0]
        pad = self.config.text.pad_token_id if self.config.text.pad_token_id is not None else (eos or [0])[0]
        rows, done = [[] for _ in range(b)], [False] * b
        for new in self._token_rows(input_ids, attention_mask, pixel_values, params, eos, StepTimes(),
                                    make_reduction(reduce, self.config), image_sizes, spec,
                                    videos=pixel_values_videos):
            for r, tokens in enumerate(new):
                for t in tokens:
                    if not done[r]:
                        rows[r].append(t)
                        done[r] = t in eos
        longest = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long)

    def _token_rows(self, input_ids, attention_mask, pixel_values, params: SamplingParams, eos: list[int],
                    times: StepTimes, reduction, image_sizes, spec: Speculation | None,
                    spec_stats: SpecStats | None = None, finished: torch.Tensor | None = None,
                    videos=None) -> Iterator[list[list[int]]]:
        """The new tokens of each row, step by step (lists: a speculative round gives several).
        `finished` [B] (bool, CPU) may be marked by the caller (stop strings) to end rows early."""
        if finished is None:
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if spec is not None:
            yield from speculative_steps(self.runner, spec, input_ids, attention_mask, pixel_values, params, eos,
                                         finished, times, spec_stats or SpecStats([], [], []), reduction, image_sizes,
                                         self.drafter(spec), videos)
            return
        for token in decode_steps(self.runner, input_ids, attention_mask, pixel_values, params, eos, finished, times,
                                  reduction, image_sizes, videos):
            yield [[t] for t in token.tolist()]

    # ---- text in, text out ----

    def generate(self, images: Sequence[ImageInput] | None = None, prompts: Sequence[str] | str = (),
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), reduce=None, speculate=None,
                 videos: Sequence[VideoInput | None] | None = None, num_frames: int | None = None) -> list[Result]:
        """One answer per prompt; `images[i]` goes with `prompts[i]` (None for a text-only prompt).
        `reduce`: visual token reduction, a spec such as "visionzip:keep=64" or a Method.
        `speculate`: speculative decoding, a spec such as "ngram" or "layerskip:k=4".
        `videos[i]` (LLaVA-OneVision; None for none) goes with `prompts[i]`, after its image: a list
        of frames, a numpy array [T, H, W, 3] or a path (see images.load_video), `num_frames`
        sampled uniformly (default: the checkpoint's video processor's, else 8)."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, list(stop)).validate()
        return list(self._run(images, prompts, params, stream=False, reduce=reduce, speculate=speculate,
                              videos=videos, num_frames=num_frames))[-1]

    def stream(self, image: ImageInput | None = None, prompt: str = "", reduce=None, speculate=None,
               video: VideoInput | None = None, num_frames: int | None = None, **kwargs) -> "TextStream":
        """Text deltas of one answer as they are produced; `.result` holds the Result afterwards.
        `video`: as in generate."""
        params = SamplingParams(**kwargs).validate()
        return TextStream(self._run([image], [prompt], params, stream=True, reduce=reduce, speculate=speculate,
                                    videos=None if video is None else [video], num_frames=num_frames))

    def _run(self, images, prompts, params: SamplingParams, stream: bool, reduce=None, speculate=None,
             videos=None, num_frames=None):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [None] * len(prompts) if images is None else list(images)
        if not prompts:
            raise UserError("give at least one prompt")
        if len(images) != len(prompts):
            raise UserError(f"{len(images)} images for {len(prompts)} prompts; give one image (or None) per prompt")
        reduction = make_reduction(reduce, self.config)
        if reduction is not None and videos is not None and any(v is not None for v in videos):
            check_videos(reduction.method)
        spec = parse_speculate(speculate, self.config.text.num_hidden_layers)
        inputs = self.inputs(images, prompts, videos, num_frames)
        input_ids, mask, pixel_values = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        self.check_context(int(mask.sum(1).max()), params.max_new_tokens)
        b = len(prompts)
        finished = torch.zeros(b, dtype=torch.bool)
        texts = [TextState(self.prompts.decode, self._eos_ids(-1), params.stop, params.max_new_tokens, stream)
                 for _ in range(b)]
        times = StepTimes()
        spec_stats = SpecStats([], [], [])
        for new in self._token_rows(input_ids, mask, pixel_values, params, list(texts[0].eos), times, reduction,
                                    inputs["image_sizes"], spec, spec_stats, finished,
                                    videos=inputs.get("pixel_values_videos")):
            for row, text in enumerate(texts):
                for token in new[row]:
                    delta, finished[row] = text.push(token)
                    if delta and row == 0:
                        yield delta
        finals = [text.finish() for text in texts]
        if stream and finals[0][1]:
            yield finals[0][1]  # what was held back (an incomplete character at the end)
        n_images = sum(im is not None for im in images)
        results = []
        for row in range(b):
            gen = texts[row].count
            image_tokens = int((input_ids[row] == self.config.image_token_index).sum())
            video_tokens = 0 if inputs.get("pixel_values_videos") is None else int(
                (input_ids[row] == self.config.video_token_index).sum())
            stats = {
                "prompt_tokens": int(mask[row].sum()) - image_tokens - video_tokens,
                "image_tokens": image_tokens,
                "video_tokens": video_tokens,
                "generated_tokens": gen,
                "batch_size": b,
                "images_in_batch": n_images,
                "vision_s": round(times.vision_s, 6),
                "ttft_s": round(times.first_token_s, 6),
                "total_s": round(times.end_s, 6),
                "decode_tok_s": _rate(gen - 1, times.end_s - times.first_token_s),
                "kv_cache_bytes": times.kv_cache_bytes,  # the whole batch's cache, as allocated
                **self._prefill_stats(reduction, row, stats_text=int(mask[row].sum()) - image_tokens - video_tokens,
                                      image_tokens=image_tokens + video_tokens),
            }
            if spec is not None:
                stats["speculate"] = {"spec": spec.spec(), **spec_stats.row(row)}
            results.append(Result(finals[row][0], texts[row].ids, texts[row].reason, stats))
        yield results

    def drafter(self, spec: Speculation) -> ModelDrafter | None:
        """The draft model of a `draft` speculation (loaded once per folder, on this model's
        device, dtype and decode mode), with a fresh cache; None for the other kinds."""
        if spec.kind != "draft":
            return None
        path = resolve_model_path(spec.model)
        draft = self._drafts.get(path)
        if draft is None:
            draft = load_model(path, self.device, self.model.dtype)
            check_draft(self.config, draft.cfg, spec.image)
            self._drafts[path] = draft
        if spec.reduce:
            make_reduction(spec.reduce, draft.cfg)  # a reduction the draft model cannot take fails here
        return ModelDrafter(Runner(draft, self.decode), spec.image, spec.reduce)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """UserError when a prompt of `prompt_tokens` tokens (images included) and `max_new_tokens`
        more do not fit the model's context (max_position_embeddings): the policy of generate,
        `run`, `eval` and the server alike, checked before anything is allocated. Dynamic-NTK
        RoPE scaling is made to run past it, and is not limited."""
        ctx = self.config.text.max_position_embeddings
        if prompt_tokens + max_new_tokens > ctx and self.config.text.rope.kind != "dynamic":
            raise UserError(f"the prompt ({prompt_tokens} tokens, images included) plus max_new_tokens "
                            f"({max_new_tokens}) is over the model's context of {ctx} tokens; ask for at most "
                            f"{max(ctx - prompt_tokens, 0)} new tokens" + (" or a shorter prompt"
                                                                          if prompt_tokens >= ctx else ""))

    def encode(self, images, prompts: list[str]):
        """Prompt ids left-padded into [B, T], their mask, and pixel_values [N, 3, H, W] (or None);
        LLaVA-1.5 only (LLaVA-NeXT inputs carry image sizes too: use `inputs`)."""
        inputs = self.inputs(images, prompts)
        if inputs["image_sizes"] is not None:
            raise UserError("LLaVA-NeXT inputs need their image sizes: use Llava.inputs() instead of encode()")
        return inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]

    def inputs(self, images, prompts: list[str], videos=None, num_frames: int | None = None) -> dict:
        """The model inputs for images (one or None per prompt) and prompts, as transformers'
        processors name them: input_ids [B, T] left-padded, attention_mask [B, T], pixel_values
        ([N, 3, H, W]; LLaVA-NeXT: [N, P, 3, H, W] tiles) or None, image_sizes ([N, 2] (height,
        width), LLaVA-NeXT only) or None, pixel_values_videos (LLaVA-OneVision: `videos`, one or
        None per prompt, as [V, F, 3, H, W], or a list of [F_i, 3, H, W] when the videos' sampled
        frame counts differ; the key is absent without videos). `model.logits(**inputs)` takes them
        as they are."""
        if self.prompts is None:
            raise UserError("this checkpoint has no tokenizer.json, so it cannot take text prompts")
        videos = [None] * len(prompts) if videos is None else list(videos)
        if len(videos) != len(prompts):
            raise UserError(f"{len(videos)} videos for {len(prompts)} prompts; give one video (or None) per prompt")
        if num_frames is not None:
            check_num_frames(num_frames)
        pixel_values_videos, video_counts = None, iter([])
        if any(v is not None for v in videos):
            self._check_videos(True)
            clips = self.video_processor([v for v in videos if v is not None], num_frames)
            video_counts = iter([self.config.video_tokens(c.shape[0]) for c in clips])
            same = len({c.shape for c in clips}) == 1
            pixel_values_videos = torch.stack(clips) if same else clips
        present = [im for im in images if im is not None]
        pixel_values, image_sizes, counts = None, None, iter([])
        if present and self.config.is_next:
            pixel_values, image_sizes = self.processor(present)
            counts = iter([self.config.image_tokens(h, w) for h, w in image_sizes.tolist()])
        elif present:
            pixel_values = self.processor(present)
        rows = []
        for image, prompt in zip(images, prompts):
            if not isinstance(prompt, str):
                raise UserError(f"prompts must be strings, got {type(prompt).__name__}")
            tokens = None if image is None or image_sizes is None else [next(counts)]
            video = None if videos[len(rows)] is None else [next(video_counts)]
            if video is not None and tokens is None:
                tokens = [] if image is None else [self.config.image_features_per_image]
            rows.append(self.prompts.prompt_ids(prompt, 0 if image is None else 1, tokens, video))
        input_ids, mask = left_pad(rows, self.config.text.pad_token_id or 0)
        mask = mask.long()
        out = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values,
               "image_sizes": image_sizes}
        if pixel_values_videos is not None:  # absent without videos: transformers' forward refuses None
            out["pixel_values_videos"] = pixel_values_videos
        return out

    def _check_videos(self, videos) -> None:
        """UserError unless the checkpoint takes videos (when `videos` is not None)."""
        if videos is not None and (not self.config.takes_videos or self.video_processor is None):
            raise UserError(f"this checkpoint (model_type {self.config.model_type!r}) takes no videos; "
                            "LLaVA-OneVision and LLaVA-NeXT-Video checkpoints do")

    def _prefill_stats(self, reduction, row: int, stats_text: int, image_tokens: int) -> dict:
        """Visual tokens entering the LLM and after each cut, their layer-weighted mean, prefill FLOPs."""
        t = self.config.text
        counts, cuts = [image_tokens], []
        if reduction is not None:
            counts = [int(c[row]) for c in reduction.counts] or [image_tokens]
            cuts = reduction.cuts
        stats = prefill_stats(stats_text, counts, cuts, t.num_hidden_layers, t.hidden_size, t.intermediate_size)
        if reduction is not None:
            stats["reduce"] = reduction.method.spec()
        return stats

    def visible_text(self, ids: list[int], stops: list[str]) -> tuple[str, bool]:
        """Decoded text cut before the first stop string, and whether one was found."""
        return visible_text(self.prompts.decode, ids, stops)

    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            return []
        if isinstance(eos_token_id, int) and eos_token_id == -1:
            return list(self.config.text.eos_token_id)
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


class TextStream:
    """Iterate for text deltas; after the loop, `result` is the finished Result."""

    def __init__(self, parts: Iterator):
        self._parts = parts
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        for part in self._parts:
            if isinstance(part, list):
                self.result = part[0]
            else:
                yield part


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if n > 0 and seconds > 0 else 0.0


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, pad_to_square: bool | None = None,
         weights: str | None = None, kv_cache: str | None = None, decode: str | None = None) -> Llava:
    """Load a LLaVA checkpoint directory (HF format, safetensors). `device` defaults to CUDA when
    available; `dtype` to float32 on the CPU and bfloat16 elsewhere. Without a path, the embedded
    default model is loaded ("default-next": the embedded LLaVA-NeXT one). `weights`: "fp"
    (default), "int8" or "int4[:group=N]" weight-only quantization; `kv_cache`: "fp" (default),
    "kivi[:bits=4,group=32,residual=128]" or "vidkv" (see fastllava.quant); `decode`: "eager"
    (default), "static" or "compiled" (see fastllava.generation.runner)."""
    weight_spec, kv_spec = parse_weights(weights), parse_kv_cache(kv_cache)  # bad specs fail before loading
    decode = check_decode_mode(decode)
    path = resolve_model_path(path)
    device = resolve_device(device)
    model = quantize_weights(load_model(path, device, dtype), weight_spec)
    cfg = model.cfg
    if cfg.is_next and pad_to_square:
        raise UserError("pad_to_square does not apply to LLaVA-NeXT checkpoints (their images are tiled)")
    if cfg.is_next:
        kind = OnevisionProcessor if cfg.is_onevision else AnyresProcessor
        processor = kind.from_dir(path, cfg.image_grid_pinpoints, cfg.vision.image_size)
    else:
        processor = ImageProcessor.from_dir(path, cfg.vision.image_size)
        if pad_to_square is not None:
            processor.pad_to_square = pad_to_square
    video_processor = (VideoProcessor.from_dir(path, processor.pieces, cfg.is_next_video) if cfg.takes_videos
                       else None)
    prompts = None
    if (path / "tokenizer.json").exists():
        prompts = PromptEncoder.from_dir(path, model.cfg.image_token_index, model.cfg.image_features_per_image,
                                         cfg.video_token_index if cfg.takes_videos else None)
    return Llava(model, processor, prompts, path, Runner(model, decode, kv_spec), weight_spec, video_processor)
