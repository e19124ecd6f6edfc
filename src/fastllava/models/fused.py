"""A linear layer that stacks several projections (q/k/v, gate/up) into one matmul."""

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """`splits` are the output widths of the stacked projections, in order."""

    def __init__(self, in_features: int, splits: list[int], bias: bool):
        super().__init__(in_features, sum(splits), bias=bias)
        self.splits = list(splits)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.splits, dim=-1)
