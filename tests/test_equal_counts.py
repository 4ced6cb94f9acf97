"""Groups whose widths one attribute holds keep one count, so the user's code runs as written.

A micro-model of timm's EfficientViT-M attention: every head splits its own qkv with the same
``[self.key_dim, self.key_dim, self.val_dim]``, and each head's value channels are a group of
their own. Cut on their own (here a per-module ratio asks more of one head; in EfficientViT-M
``round_to="auto"`` aligned one head and not another), the heads kept different widths, no single
``val_dim`` fitted, and graphprune had to rewrite the attention as a graph. With equal counts
the user's class runs its own forward with ``val_dim`` updated. Checked against the oracles:
identity at ratio 0, the masked reference (``verify=True``), onnxruntime, dead units.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import graphprune
from tests.oracles import check_dead_channels, check_onnx, check_ratio_zero_identity


class SharedSplitAttention(nn.Module):
    """Heads with their own qkv, each split by the module's one ``key_dim`` / ``val_dim``."""

    def __init__(self, dim: int = 16, heads: int = 2, key_dim: int = 4, val_dim: int = 8) -> None:
        super().__init__()
        self.key_dim, self.val_dim = key_dim, val_dim
        self.qkvs = nn.ModuleList(nn.Linear(dim, 2 * key_dim + val_dim) for _ in range(heads))
        self.proj = nn.Linear(heads * val_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for qkv in self.qkvs:
            q, k, v = qkv(x).split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
            outs.append((q @ k.transpose(-2, -1)).softmax(-1) @ v)
        return self.proj(torch.cat(outs, -1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 16), SharedSplitAttention(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(x)))


def _build() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 5, 6)


def test_heads_split_by_one_attribute_keep_one_width() -> None:
    model, x = _build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, plan = graphprune.compact_with_plan(model, x, 0.25, round_to=1, verify=True,
                                                   ratios={"attn.qkvs.0": 0.5})
    attn = small.attn
    assert type(attn) is SharedSplitAttention and not plan.rewrites, plan.notes
    widths = {q.out_features - 2 * attn.key_dim for q in attn.qkvs}
    assert widths == {attn.val_dim} and attn.val_dim < 8, (widths, attn.val_dim)
    assert any("equal counts" in n for n in plan.notes), plan.notes
    check_onnx(small, x)


def test_the_oracles_hold() -> None:
    model, x = _build()
    check_ratio_zero_identity(model, x)
    small = check_dead_channels(model, x, 0.5, round_to=1)
    assert small.attn.val_dim < 8
