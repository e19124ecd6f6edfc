"""Plain PyTorch modules of the LLaVA family."""

from __future__ import annotations


def build_model(cfg):
    """The model class a LlavaConfig asks for: LLaVA-NeXT-Video, LLaVA-OneVision, LLaVA-NeXT or
    LLaVA-1.5 (see llava_next.build_model for the last three)."""
    if cfg.is_next_video:
        from .next_video import NextVideoModel

        return NextVideoModel(cfg)
    from .llava_next import build_model as build_image_model

    return build_image_model(cfg)
