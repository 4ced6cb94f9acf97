"""Importance criteria: one score per unit of a group, aggregated over *all* its members.

A unit is every position removed together (a conv's output channel, the BN entries of that
channel, the next conv's input slice, ...). Scoring only the producer would ignore most of
what is removed; we sum each member's per-position magnitude, normalised by that member's mean
so a large consumer matrix does not drown a small producer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.analysis import Group, param_tensor
from graphprune.errors import InputError

Criterion = Callable[[Group, nn.Module], Any]


def _per_position(t: torch.Tensor, dim: int, p: int) -> np.ndarray:
    t = t.detach().float()
    if t.is_meta:
        return np.ones(t.shape[dim])
    moved = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return (moved.abs().sum(1) if p == 1 else moved.pow(2).sum(1)).cpu().numpy()


def magnitude(p: int) -> Criterion:
    """L1 (p=1) or L2 (p=2) magnitude of every member slice of a unit."""

    def score(group: Group, model: nn.Module) -> np.ndarray:
        total = np.zeros(group.num_units)
        params = dict(model.named_parameters(remove_duplicate=False))
        for m in group.members:
            if m.name not in params:  # buffers (BN running stats) say nothing about importance
                continue
            vals = _per_position(param_tensor(model, m.name), m.dim, p)
            sel = m.unit_of >= 0
            if not sel.any():
                continue
            mean = vals[sel].mean()
            norm = vals[sel] / mean if mean > 0 else vals[sel]
            np.add.at(total, m.unit_of[sel], norm)
        return total

    return score


def random_importance(seed: int = 0) -> Criterion:
    """A baseline: random scores (deterministic for a seed)."""

    def score(group: Group, model: nn.Module) -> np.ndarray:
        return np.random.default_rng(seed + group.index).random(group.num_units)

    return score


CRITERIA: dict[str, Callable[[], Criterion]] = {
    "l1": lambda: magnitude(1),
    "l2": lambda: magnitude(2),
    "random": lambda: random_importance(0),
}


def resolve(importance: str | Criterion) -> Criterion:
    if callable(importance):
        return importance
    if isinstance(importance, str) and importance.lower() in CRITERIA:
        return CRITERIA[importance.lower()]()
    raise InputError(
        f"unknown importance {importance!r}: use one of {sorted(CRITERIA)} or a callable "
        "(group, model) -> one score per unit (lower scores are removed first)."
    )


def scores_for(criterion: Criterion, group: Group, model: nn.Module) -> np.ndarray:
    raw = criterion(group, model)
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    arr = np.asarray(raw, dtype=np.float64).reshape(-1)
    if arr.shape[0] != group.num_units:
        raise InputError(
            f"importance returned {arr.shape[0]} scores for group {group.index} with "
            f"{group.num_units} units; return exactly one score per unit."
        )
    return arr
