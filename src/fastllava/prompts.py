"""Prompts: the LLaVA-1.5 conversation format (or the checkpoint's chat template), tokenization
through `tokenizer.json`, and expansion of the image token to one id per visual feature."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .config import read_json_file
from .errors import UserError

LLAVA15_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"  # one turn with one image (see format_turns)
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: its role, its text, and how many images (then videos) come
    before the text."""

    role: str  # "user" or "assistant"
    text: str
    images: int = 0
    videos: int = 0  # LLaVA-OneVision, LLaVA-NeXT-Video


class Conversation(str):
    """A conversation's text (its turns' texts joined by newlines: what length limits count) that
    carries its turns: `PromptEncoder.prompt_ids` renders the turns, so a Conversation goes where
    a one-turn prompt string went."""

    turns: tuple[Turn, ...]

    def __new__(cls, turns: Sequence[Turn]):
        turns = check_turns(turns)
        self = super().__new__(cls, "\n".join(t.text for t in turns if t.text))
        self.turns = turns
        return self


def check_turns(turns: Sequence[Turn]) -> tuple[Turn, ...]:
    """The turns as a tuple, or UserError unless they alternate user/assistant from a user turn
    to a user turn, with images in user turns only."""
    turns = tuple(turns)
    if not turns:
        raise UserError("a conversation needs at least one user turn")
    for i, t in enumerate(turns):
        want = ROLES[i % 2]
        if t.role != want:
            raise UserError(f"turn {i} is {t.role!r}, expected {want!r}: turns alternate user and assistant, "
                            "starting with user")
        if t.images < 0 or (t.images and t.role != "user"):
            raise UserError(f"turn {i}: images are only allowed in user turns, got {t.images}")
        if t.videos < 0 or (t.videos and t.role != "user"):
            raise UserError(f"turn {i}: videos are only allowed in user turns, got {t.videos}")
        if not isinstance(t.text, str):
            raise UserError(f"turn {i}: the text must be a string, got {type(t.text).__name__}")
    if turns[-1].role != "user":
        raise UserError("a conversation must end with a user turn (the model answers it)")
    return turns


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, image_token_index: int, features_per_image: int,
                 chat_template: str | None = None, special: dict | None = None, video_token_index: int | None = None):
        self.tokenizer = tokenizer
        self.image_token_index = image_token_index
        self.video_token_index = video_token_index  # LLaVA-OneVision, LLaVA-NeXT-Video; None: no videos
        self.video_token = (tokenizer.id_to_token(video_token_index) if video_token_index is not None else None) \
            or "<video>"
        self.features_per_image = features_per_image
        self.special = special or {}
        self.image_token = tokenizer.id_to_token(image_token_index) or "<image>"
        self._template = _compile_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, path: Path, image_token_index: int, features_per_image: int,
                 video_token_index: int | None = None) -> "PromptEncoder":
        file = path / "tokenizer.json"
        if not file.exists():
            raise UserError(f"no tokenizer.json in {path}; text prompts need the checkpoint's tokenizer")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise UserError(f"cannot read {file}: {e}") from None
        tok_cfg = _read_json(path / "tokenizer_config.json")
        template = tok_cfg.get("chat_template")
        template = _read_json(path / "chat_template.json").get("chat_template", template)
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        special = {k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(tokenizer, image_token_index, features_per_image, template, special, video_token_index)

    def format(self, prompt: str, num_images: int = 1) -> str:
        """The full model input text for one user turn with `num_images` images before the prompt."""
        return self.format_turns([Turn("user", prompt, num_images)])

    def format_turns(self, turns: Sequence[Turn]) -> str:
        """The full model input text of a conversation (user and assistant turns, ending with a
        user turn), then the assistant's generation prompt. Each turn's images come before its
        text. With the checkpoint's chat template: `messages` with one {"type": "image"} part per
        image; else LLaVA-1.5's format as transformers' llava-1.5 chat template renders it:
        "USER: <image>\\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:"."""
        turns = check_turns(turns)
        if self._template is not None:
            messages = [{"role": t.role, "content": [{"type": "image"} for _ in range(t.images)]
                         + [{"type": "video"} for _ in range(t.videos)]
                         + [{"type": "text", "text": t.text}]} for t in turns]
            try:
                return self._template.render(
                    messages=messages, add_generation_prompt=True,
                    **{k: v for k, v in self.special.items() if v is not None},
                )
            except Exception as e:  # jinja2 errors and raise_exception() calls in the template
                raise UserError(f"the checkpoint's chat template failed: {e}") from None
        parts = []
        for t in turns:
            images = "".join(f"{self.image_token}\n" for _ in range(t.images))
            images += "".join(f"{self.video_token}\n" for _ in range(t.videos))
            parts.append(f"{t.role.upper()}: {images}{t.text} ")
        return "".join(parts) + "ASSISTANT:"

    def encode(self, text: str, image_tokens: list[int] | None = None,
               video_tokens: list[int] | None = None) -> list[int]:
        """Token ids of a formatted text, the i-th image token repeated image_tokens[i] times (its
        image's visual features; default features_per_image for every image token found), the
        i-th video token video_tokens[i] times (None: the text must hold no video token)."""
        bos = self.special.get("bos_token")
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        found = ids.count(self.image_token_index)
        counts = iter([self.features_per_image] * found if image_tokens is None else image_tokens)
        if image_tokens is not None and found != len(image_tokens):
            raise UserError(f"the formatted prompt holds {found} image tokens for {len(image_tokens)} image(s); "
                            f"is {self.image_token!r} (id {self.image_token_index}) in the tokenizer?")
        video = self.video_token_index
        found = ids.count(video) if video is not None else 0
        if found != len(video_tokens or []):
            raise UserError(f"the formatted prompt holds {found} video tokens for {len(video_tokens or [])} video(s)"
                            + (f"; is {self.video_token!r} (id {video}) in the tokenizer?" if video_tokens else
                               f"; give a video for each {self.video_token!r} in the prompt"))
        video_counts = iter(video_tokens or [])
        out: list[int] = []
        for i in ids:
            out.extend([i] * next(counts) if i == self.image_token_index else
                       [i] * next(video_counts) if video is not None and i == video else [i])
        return out

    def prompt_ids(self, prompt: str, num_images: int = 1, image_tokens: list[int] | None = None,
                   video_tokens: list[int] | None = None) -> list[int]:
        """Ids of one user turn with `num_images` images; `image_tokens`: each image's visual
        features when they differ by image (LLaVA-NeXT), else features_per_image each;
        `video_tokens`: each video's visual tokens (LLaVA-OneVision, LLaVA-NeXT-Video; the videos
        follow the images).
        A `Conversation` (a str carrying its turns) gives the ids of its turns (`chat_ids`)."""
        turns = getattr(prompt, "turns", None)
        if turns is None:
            turns = [Turn("user", prompt, num_images if image_tokens is None else len(image_tokens),
                          len(video_tokens or []))]
        elif video_tokens and sum(t.videos for t in turns) != len(video_tokens):
            raise UserError(f"{len(video_tokens)} video(s) for a conversation that holds "
                            f"{sum(t.videos for t in turns)}")
        elif image_tokens is None and num_images != sum(t.images for t in turns):
            raise UserError(f"{num_images} image(s) for a conversation that holds {sum(t.images for t in turns)}")
        return self.chat_ids(turns, image_tokens, video_tokens)

    def chat_ids(self, turns: Sequence[Turn], image_tokens: list[int] | None = None,
                 video_tokens: list[int] | None = None) -> list[int]:
        """Ids of a conversation (see format_turns), the images' tokens expanded in order:
        image_tokens[i] ids for the i-th image (default features_per_image each)."""
        turns = check_turns(turns)
        n = sum(t.images for t in turns)
        counts = [self.features_per_image] * n if image_tokens is None else list(image_tokens)
        if len(counts) != n:
            raise UserError(f"{len(counts)} image token count(s) for {n} image(s) in the conversation")
        for t in turns:
            try:
                t.text.encode()
            except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8
                raise UserError("the prompt is not valid UTF-8 text (it holds a lone surrogate)") from None
        videos = sum(t.videos for t in turns)
        if videos != len(video_tokens or []):
            raise UserError(f"{len(video_tokens or [])} video token count(s) for {videos} video(s) in the conversation")
        return self.encode(self.format_turns(turns), counts, video_tokens or None)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _compile_template(source: str):
    """A chat template in a sandboxed jinja2 environment, with the `{% generation %}` block and
    `raise_exception()` that transformers' templates use."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # marks assistant text for training masks; renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the checkpoint's chat template does not parse: {e}") from None


def _read_json(path: Path) -> dict:
    """A tokenizer-side JSON file of the checkpoint (bounded, a regular file), {} when absent or not an object."""
    d = read_json_file(path) if path.exists() else {}
    return d if isinstance(d, dict) else {}


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
