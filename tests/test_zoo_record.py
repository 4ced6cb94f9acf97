"""tools/zoo.py says why a module was kept whole rather than rewritten as a graph.

A micro-model whose attention cannot run smaller (it merges heads back to the width of its
input) and is called twice per forward: the rewrite (docs/rewrite.md) declines shared modules,
so graphprune keeps it whole and notes why. The zoo's row must carry that reason, not only
"kept whole". Uses graphprune's real plan; no timm or torchvision.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import graphprune
from tests.rewrite_models import Block

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import zoo  # noqa: E402


class SharedBlockViT(nn.Module):
    """One Block (InputWidthAttention + MLP) applied twice: a shared module, never rewritten."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(12, dim), Block(dim), nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(self.embed(x))).mean(1))


def test_the_zoo_row_says_why_the_rewrite_was_declined() -> None:
    torch.manual_seed(0)
    model, x = SharedBlockViT().eval(), torch.randn(2, 6, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    assert small.block.attn.qkv.out_features == 96  # kept whole: the case this test is about
    record = zoo.gp_record(plan, [str(w.message) for w in caught if "graphprune" in str(w.message)])
    result = {"ok": True, **record}
    assert not result["rewritten"]
    why = zoo.why_not_rewritten(result)
    assert "block.attn" in why and "exactly once" in why, why
    cell = zoo.whole_cell(result)
    assert cell.startswith("kept whole") and f"not rewritten as graphs: {why[:40]}" in cell, cell
    assert any(n.startswith(zoo.NOT_REWRITTEN) for n in result["rewrite_notes"])
