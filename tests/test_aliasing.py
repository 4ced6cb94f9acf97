"""graph.aliasing: which inputs a traced program writes into.

Oracle: hand-written forwards whose writes are known: in-place activations write nothing of the
user's; a buffer updated in place, a view of a buffer written through ``split``, an embedding
renormalised by ``max_norm`` are the inputs named. Copying (or not copying) the user's weights
before a run rests on this answer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from graphprune.graph.aliasing import written_inputs


class InplaceActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.hardswish(self.act(self.conv(x)), inplace=True)


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return self.conv(x)


class WritesThroughSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("state", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, _tail = self.state.split(2)
        head.mul_(0.5)
        return self.conv(x) * self.state.view(1, 4, 1, 1)


class Renorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, max_norm=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x.flatten().long().clamp(0, 9) % 10).sum(0)


CASES = {
    "inplace activations": (InplaceActivations, set()),
    "buffer updated in place": (CountsCalls, {"b_count"}),
    "buffer written through split": (WritesThroughSplit, {"b_state"}),
    "embedding max_norm": (Renorms, {"p_emb_weight"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_written_inputs_names_what_the_forward_writes(name: str) -> None:
    cls, expected = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(cls().eval(), (torch.randn(1, 3, 6, 6),), strict=False)
    assert written_inputs(program) == expected
