"""Kernel and block masks (graphprune.unstructured.kernel_prune / block_prune): whole tiles go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphprune import unstructured as U
from graphprune.errors import InputError


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(96, 10))


def test_kernel_prune_zeroes_whole_kernels_smallest_first_and_leaves_linear_alone() -> None:
    model = _convnet()
    w0 = model[2].weight.detach().clone()
    lin = model[4].weight.detach().clone()
    U.kernel_prune(model, 0.5)
    w = model[2].weight
    gone = (w == 0).all(dim=(2, 3))
    assert torch.equal(gone, (w == 0).any(dim=(2, 3)))  # a kernel goes whole or not at all
    assert int(gone.sum()) == 24  # half of 6 x 8 kernels
    norms = w0.pow(2).sum((2, 3))
    assert norms[gone].max() <= norms[~gone].min()  # the smallest kernels went
    assert torch.equal(w[~gone], w0[~gone]) and torch.equal(model[4].weight, lin)


def test_block_prune_zeroes_whole_tiles_and_zero_amount_is_the_identity() -> None:
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    U.block_prune(model, 0.0, 4)
    assert torch.equal(model(x), before)
    U.block_prune(model, 0.5, 4, params=["4"])
    tiles = (model[4].weight == 0).reshape(10, 24, 4).permute(1, 0, 2)  # 96 = 24 tiles of 4 columns
    for c in range(24):
        for r in range(0, 10, 4):
            t = tiles[c, r:r + 4]
            assert bool(t.all()) or not bool(t.any())
    with pytest.raises(InputError):
        U.block_prune(model, 0.5, 0)
