"""A compact call that removes nothing says so, with the reasons and the option that helps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphprune


class NormedStream(nn.Module):
    """Every width is the normalised stream's (or the output's): nothing is free at the default."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _quiet(model: nn.Module, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphprune.compact(model.eval(), torch.randn(2, 6), **kw)
    return [str(w.message) for w in caught if "nothing was removed" in str(w.message)]


def test_everything_kept_whole_warns_with_reasons_and_prune_hidden() -> None:
    with pytest.warns(UserWarning, match="nothing was removed at ratio=0.3") as caught:
        graphprune.compact(NormedStream().eval(), torch.randn(2, 6), ratio=0.3)
    text = str(caught[0].message)
    assert "normalises over these channels" in text or "reduces over these channels" in text, text
    assert "prune_hidden=True" in text
    assert " in norm" not in text  # reasons are stated once, without every place they occur


def test_prune_hidden_removes_and_is_quiet() -> None:
    assert _quiet(NormedStream(), ratio=0.3, prune_hidden=True) == []


def test_a_ratio_too_small_for_one_unit_is_named() -> None:
    messages = _quiet(Mlp(), ratio=0.01)
    assert len(messages) == 1 and "less than one of their units" in messages[0]
    assert "prune_hidden" not in messages[0]


def test_no_warning_when_units_are_removed_or_ratio_is_zero() -> None:
    assert _quiet(Mlp(), ratio=0.5) == []
    assert _quiet(NormedStream(), ratio=0.0) == []
