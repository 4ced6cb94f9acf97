"""Ops that mix positions along a dim (softmax, sort, topk, roll...): which dim, and what leaves.

``topk(x, k, dim)`` and ``roll(x, shifts, dims)`` take their dims third, not second; ``roll``
without dims rolls the flattened tensor (every dim mixed); ``topk`` makes its dim k long, so no
channel labels leave along it. Each case is checked with verify on (the reference agrees) and
by which widths changed.
"""

from __future__ import annotations

import torch
from oracles import check_ratio_zero_identity
from torch import nn

import graphprune


class TopK(nn.Module):
    """The k largest features of a layer feed the next one: that layer's width stays."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(torch.relu(self.fc0(x)))
        return self.fc2(h.topk(4, dim=-1).values)


class Roll(nn.Module):
    def __init__(self, dims: int | None) -> None:
        super().__init__()
        self.fc0 = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 3)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc0(x))
        h = torch.roll(h, 3, self.dims) if self.dims is not None else torch.roll(h, 3)
        return self.fc1(h)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8)


def test_topk_keeps_its_dim_whole_and_passes_no_labels_along_it() -> None:
    torch.manual_seed(0)
    model, x = TopK().eval(), _x()
    small = graphprune.compact(model, x, ratio=0.5)
    assert small.fc1.out_features == 16  # topk over these features: all stay
    assert small.fc0.out_features == 8  # the layer before is free
    assert small.fc2.in_features == 4
    check_ratio_zero_identity(model, x)


def test_roll_along_tokens_leaves_channels_prunable() -> None:
    torch.manual_seed(0)
    small = graphprune.compact(Roll(dims=1).eval(), _x(), ratio=0.5)
    assert small.fc0.out_features == 8


def test_roll_without_dims_mixes_every_dim() -> None:
    """Rolled flat, a position moves into the next channel: the channels stay whole."""
    torch.manual_seed(0)
    small = graphprune.compact(Roll(dims=None).eval(), _x(), ratio=0.5)
    assert small.fc0.out_features == 16
