"""Sparsity-inducing penalties to add to your own training loss before pruning.

Pruning removes the units the criterion ranks lowest; training with a penalty first makes
that ranking clear-cut (many units driven to ~0, the rest doing the work), so the accuracy lost
at compaction time is small.

* :func:`bn_l1_penalty` - network slimming (Liu et al., 2017): an L1 penalty on BatchNorm scales
  pushes the gammas of unneeded channels to zero; prune afterwards with ``importance="bn_scale"``.
* :class:`GroupLasso` - group lasso over graphprune's *coupled* groups: for every unit, the L2
  norm of all the parameter slices removed with it (producer filter, BN entries, the consumer's
  input slice, ...), summed. It drives whole units to zero exactly along the lines ``compact``
  will cut, which a per-layer penalty cannot do for residual streams or attention heads.

Both return a scalar tensor with gradients; add it to the loss::

    lasso = graphprune.GroupLasso(model, x, strength=1e-4)
    loss = F.cross_entropy(model(xb), yb) + lasso(model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.analysis import analyze, param_tensor
from graphprune.graph.copies import keeps_global_rng

_BN = nn.modules.batchnorm._BatchNorm


def bn_l1_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """``strength * sum(|gamma|)`` over the affine BatchNorm layers of ``model``."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, _BN) and m.weight is not None]
    if not terms:
        raise InputError(
            "bn_l1_penalty: the model has no affine BatchNorm layer; use GroupLasso for models "
            "without BatchNorm."
        )
    return strength * torch.stack(terms).sum()


@dataclass
class _Slice:
    name: str
    dim: int
    positions: torch.Tensor  # positions along dim that belong to a unit
    units: torch.Tensor  # unit index of each of those positions


class GroupLasso:
    """Group lasso over coupled groups: ``strength * sum over units of ||all slices of the unit||_2``.

    The groups are found once (``graphprune.analyze``) from ``model`` and ``example_input``;
    the penalty reads the parameters by name from whatever model it is called with, so it keeps
    working on the live, training model. Only prunable groups count (frozen ones are kept whole
    anyway). ``eps`` keeps the gradient of the square root finite at exactly-zero units.
    """

    @keeps_global_rng
    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        strength: float = 1e-4,
        *,
        ignored_layers: Any = (),
        prune_hidden: bool = False,
        attention: str = "heads",
        eps: float = 1e-12,
    ) -> None:
        structure = {"prune_hidden": prune_hidden, "attention": attention}
        analysis = analyze(model, example_input, ignored_layers=ignored_layers, **structure)
        params = dict(analysis.model.named_parameters(remove_duplicate=False))
        self.strength = float(strength)
        self.eps = float(eps)
        self.model = model
        self.groups: list[tuple[int, int, list[_Slice]]] = []
        for g in analysis.groups:
            if not g.members or g.num_units < 2:
                continue
            slices = []
            for m in g.members:
                if m.name not in params:
                    continue
                pos = np.flatnonzero(m.unit_of >= 0)
                if pos.size:
                    slices.append(
                        _Slice(m.name, m.dim, torch.as_tensor(pos), torch.as_tensor(m.unit_of[pos]))
                    )
            if slices:
                self.groups.append((g.index, g.num_units, slices))
        if not self.groups:
            raise InputError("GroupLasso: the model has no prunable group (nothing to penalise)")

    def unit_norms(self, model: nn.Module | None = None) -> dict[int, torch.Tensor]:
        """L2 norm of every unit, per group index (differentiable)."""
        model = self.model if model is None else model
        out: dict[int, torch.Tensor] = {}
        for index, units, slices in self.groups:
            total = None
            for s in slices:
                w = param_tensor(model, s.name)
                sq = w.pow(2).movedim(s.dim, 0).reshape(w.shape[s.dim], -1).sum(1)
                part = torch.zeros(units, dtype=sq.dtype, device=sq.device).index_add(
                    0, s.units.to(sq.device), sq[s.positions.to(sq.device)]
                )
                total = part if total is None else total + part
            assert total is not None
            out[index] = (total + self.eps).sqrt()
        return out

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        norms = self.unit_norms(model)
        return self.strength * torch.stack([n.sum() for n in norms.values()]).sum()
