"""Data criteria that cannot tell units apart must not fall back to "lowest index first".

apoz on an LSTM: its hidden state is never exactly zero, so every unit's zero fraction is 0 and
the scores all tie. The documented secondary measure (mean |activation|) must decide; the
oracle measures that mean independently with the model's own forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_apoz_ties_are_broken_by_mean_activation_not_by_index() -> None:
    torch.manual_seed(0)
    model = Tagger().eval()
    data = [(torch.randn(4, 5, 6), None) for _ in range(3)]
    with torch.no_grad():
        h = torch.cat([model.lstm(x)[0][:, -1] for x, _ in data])
    assert (h != 0).all()  # the degenerate case: apoz alone scores every unit 1.0
    expected = sorted(np.argsort(h.abs().mean(0).numpy(), kind="stable")[:8].tolist())
    assert expected != list(range(8))  # lowest-index-first would fail this test
    plan = graphprune.make_plan(model, data[0][0], ratio=0.5, importance="apoz", data=data)
    group = next(g for g in plan.groups if g.removed and g.units == 16)
    assert group.removed == expected


def test_tied_scores_from_any_criterion_fall_back_to_magnitude() -> None:
    """A callable giving every unit the same score: the weakest units (L2) go, with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[:] = torch.arange(8, 0, -1, dtype=torch.float32)[:, None] / 8
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="same score"):
        plan = graphprune.make_plan(model, x, ratio=0.25, importance=lambda g, m: np.ones(g.num_units))
    assert plan.slices["0.weight"][0] == list(range(6))  # units 6 and 7 have the smallest rows
