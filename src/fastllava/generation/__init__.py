"""The execution core: the staged prefill, the decode step, sampling, the per-sequence text state,
and the Runner that holds a model's decode mode, cache layout and compiled callables."""

from .runner import (CACHE_BUCKET, DECODE_MODES, PREFILL_BUCKET, Runner, StepTimes, check_decode_mode,
                     check_left_padded, decode_steps, step_span, sync)
from .sampling import MIN_TEMPERATURE, SamplingParams, new_generator, sample
from .text import TextState, visible_text

__all__ = ["CACHE_BUCKET", "DECODE_MODES", "MIN_TEMPERATURE", "PREFILL_BUCKET", "Runner", "SamplingParams",
           "StepTimes", "TextState", "check_decode_mode", "check_left_padded", "decode_steps", "new_generator",
           "sample", "step_span", "sync", "visible_text"]
