"""A word-level `tokenizer.json` for models trained on the fixed shapes vocabulary, and the
matching `preprocessor_config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..images import CLIP_MEAN, CLIP_STD
from .questions import LONG_ANSWER_WORDS, PUNCTUATION, VOCABULARY

UNK, BOS, EOS, IMAGE = "<unk>", "<s>", "</s>", "<image>"
TEMPLATE_WORDS = ("user", "assistant")  # the LLaVA-1.5 prompt "USER: <image>\n... ASSISTANT:"


def default_words() -> list[str]:
    """Every token a shapes prompt, answer or caption can hold; the long-answer words last, so that
    the earlier words keep the ids they had before those were added."""
    return list(dict.fromkeys([*TEMPLATE_WORDS, *PUNCTUATION, *VOCABULARY, *LONG_ANSWER_WORDS]))


def build_word_tokenizer(words: list[str], image_token_id: int, vocab_size: int) -> Tokenizer:
    """Whitespace-split, lower-cased word tokenizer: <unk> 0, <s> 1, </s> 2, `words` from 3 on,
    skipping `image_token_id`, which holds the special token <image>. Prepends <s> when encoding;
    decoding joins the words with spaces, none before punctuation ("a circle, a star.")."""
    if not 3 <= image_token_id < vocab_size:
        raise ValueError(f"image token id {image_token_id} must be in [3, {vocab_size})")
    vocab = {UNK: 0, BOS: 1, EOS: 2, IMAGE: image_token_id}
    next_id = 3
    for word in dict.fromkeys(w.lower() for w in words):
        if word in vocab:
            continue
        if next_id == image_token_id:
            next_id += 1
        vocab[word] = next_id
        next_id += 1
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{len(vocab)} tokens do not fit in a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # no word starts with ##: spaces, cleaned up
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, IMAGE)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 1)])
    return tok


def write_preprocessor_config(path: str | Path, image_size: int, pinpoints: list | None = None) -> Path:
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std) at `image_size`; with
    `pinpoints` (height, width), LLaVA-NeXT's (transformers' LlavaNextImageProcessor) tiling them."""
    file = Path(path) / "preprocessor_config.json"
    tiling = {} if pinpoints is None else {"image_grid_pinpoints": [list(p) for p in pinpoints], "do_pad": True}
    file.write_text(json.dumps({
        "image_processor_type": "LlavaNextImageProcessor" if pinpoints else "CLIPImageProcessor", **tiling,
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }, indent=2) + "\n")
    return file
