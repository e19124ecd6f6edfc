"""`rebalance`: the token compression of the text-dominance study: keep the visual tokens that the
vision tower's class token rates most salient, so that fewer, non-redundant visual tokens draw the
language model's attention."""

from __future__ import annotations

from dataclasses import dataclass

from .fastervlm import FasterVLM
from .registry import register


@register
@dataclass
class Rebalance(FasterVLM):
    """The paper measures text dominance (the Modality Dominance Index: attention per text token
    over attention per visual token in the language model) and traces it to attention diluted over
    hundreds of redundant visual tokens; its remedy is to compress them before the language model.
    Each patch gets the importance s_i = Attn([CLS], v_i), the vision tower's class-token attention
    to it (selected layer, heads averaged), which the paper takes as a saliency that is stable
    across layers; with a reduction rate r only the top M = N(1 - r) patches are kept (the paper's
    rates 75%, 90%, 95% are keep=144, 57, 28 of LLaVA-1.5's 576). Here the budget is `keep`, as for
    every method, so that sweeps treat it alike. The selection is the one of `fastervlm` (the
    paper's compression follows FasterVLM); it is registered under this name as the paper's
    method. The rest are dropped (`merge=none`, the paper's) or merged into the most similar kept
    token (`merge=mean|prop`, see reduction.merging). On LLaVA-NeXT per tile, as fastervlm.

    Wu, Tang, Zheng and Jiang, "When Language Overrules: Revealing Text Dominance in Multimodal
    Large Language Models", arXiv:2508.10552, 2025.
    """

    name = "rebalance"
    paper = "Wu et al. 2025, When Language Overrules: Revealing Text Dominance in Multimodal LLMs (arXiv:2508.10552)"
