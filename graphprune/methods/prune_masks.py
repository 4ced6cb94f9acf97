"""torch.nn.utils.prune masks turned into a smaller model.

``torch.nn.utils.prune`` (``l1_unstructured``, ``ln_structured``, ``custom_from_mask``,
``global_unstructured`` ...) keeps every tensor at full size: ``weight`` becomes
``weight_orig * weight_mask``, recomputed by a forward pre-hook, so the masks save nothing. This
module lets graphprune start from such a model:

* :func:`fold_masks` returns a copy with every mask folded into its tensor (what ``prune.remove``
  does, on the copy: the user's masked model is left as it was) and the masks by tensor name.
  Every criterion then scores the effective (masked) weights.
* :class:`MaskImportance` (``importance="mask"``) removes exactly the units the masks have
  emptied. A unit's masked positions are judged per coupled group, on the side of the units'
  producers and on the side of their consumers:

  - **producers** (conv/linear output rows, embedding columns, biases, norm parameters): the unit
    goes when every producing *weight* zeroes it entirely (a producing weight without a mask keeps
    it: in a residual stream a channel is only dead if every branch writing it is) and so does
    every producing bias or norm that carries a mask (unmasked ones are dropped with the unit);
  - **consumers** (conv/linear input columns and any other member): the unit also goes when it
    has consumers, each carries a mask, and each masks the unit's positions entirely (nothing
    reads it).

  Masks that empty no whole unit (unstructured ones, mostly) are only folded. Where a removed
  unit still had a live bias or norm shift, the compact model differs from the masked one by
  that constant; where the masked units are fully dead the outputs are the same.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from graphprune.graph.analysis import Analysis, Group, Member
from graphprune.planning.cut import produces
from graphprune.planning.scoring import Importance


def prune_hooks(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, tensor name)`` of every torch.nn.utils.prune reparametrisation in ``model``."""
    found = []
    for path, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((path, hook._tensor_name))
    return found


def fold_masks(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``model`` itself when it carries no prune masks; else a copy with the masks folded in.

    The copy has plain parameters holding ``orig * mask`` and no ``*_orig`` / ``*_mask`` tensors
    or pruning pre-hooks; the second value maps each masked tensor's name to a copy of its mask.
    The masked attribute itself (``weight``, recomputed by the hook with autograd history, which
    ``copy.deepcopy`` refuses) is not copied: the fold recomputes it.
    """
    hooks = prune_hooks(model)
    if not hooks:
        return model, {}
    masks: dict[str, torch.Tensor] = {}
    memo: dict[int, Any] = {}
    for path, name in hooks:
        mod = model.get_submodule(path) if path else model
        full = f"{path}.{name}" if path else name
        masks[full] = getattr(mod, name + "_mask").detach().clone()
        derived = mod.__dict__.get(name)
        if isinstance(derived, torch.Tensor):
            memo[id(derived)] = None
    folded = copy.deepcopy(model, memo)
    with torch.no_grad():
        for path, name in hooks:
            mod = folded.get_submodule(path) if path else folded
            if name in mod.__dict__:
                del mod.__dict__[name]
            prune.remove(mod, name)
    return folded, masks


def _unit_zero(mask: torch.Tensor, member: Member, units: int) -> tuple[np.ndarray, np.ndarray]:
    """(has positions, all masked) per unit of ``member``'s group in this mask."""
    flat = mask.detach().movedim(member.dim, 0).reshape(mask.shape[member.dim], -1)
    zero_pos = (flat == 0).all(dim=1).cpu().numpy()
    sel = member.unit_of >= 0
    total = np.bincount(member.unit_of[sel], minlength=units)
    zeros = np.bincount(member.unit_of[sel], weights=zero_pos[sel].astype(np.float64), minlength=units)
    return total > 0, (total > 0) & (zeros == total)


class MaskImportance(Importance):
    """``importance="mask"``: units emptied by torch.nn.utils.prune masks score 0, others 1.

    ``exact_counts`` says how many units of each group go (exactly the emptied ones, which
    ``build_plan`` takes instead of a ratio); the scores only say which. See the module docstring
    for when a unit counts as emptied.
    """

    name = "mask"
    quiet_ties = True  # most groups have no emptied unit: all 1.0 is the expected answer

    def __init__(self, masks: dict[str, torch.Tensor], bound: float | None = None) -> None:
        super().__init__()
        self.masks = masks
        self.bound = bound

    def exact_counts(self, analysis: Analysis) -> dict[int, int]:
        """Units each prunable group loses (``build_plan`` asks): exactly its emptied units, at
        most ``round(bound * units)`` when a bound (the user's ratio) is given."""
        counts = {}
        for g in analysis.groups:
            if g.members and g.num_units > 1:
                n = int(self.dead(g, analysis.model).sum())
                counts[g.index] = n if self.bound is None else min(n, int(round(self.bound * g.num_units)))
        return counts

    def dead(self, group: Group, model: nn.Module) -> np.ndarray:
        n = group.num_units
        prod_dead = np.ones(n, dtype=bool)
        prod_seen = np.zeros(n, dtype=bool)
        cons_dead = np.ones(n, dtype=bool)
        cons_seen = np.zeros(n, dtype=bool)
        for m in group.members:
            mask = self.masks.get(m.name)
            path, _, attr = m.name.rpartition(".")
            try:
                mod = model.get_submodule(path) if path else model
                tensor = getattr(mod, attr)
            except AttributeError:
                continue
            if not isinstance(tensor, torch.Tensor):
                continue
            is_param = isinstance(tensor, nn.Parameter)
            if produces(mod, attr, m.dim):
                if mask is None:
                    if tensor.dim() >= 2:  # an unmasked producing weight keeps its units alive
                        has = np.bincount(m.unit_of[m.unit_of >= 0], minlength=n) > 0
                        prod_dead &= ~has
                    continue
                has, zero = _unit_zero(mask, m, n)
                prod_seen |= zero
                prod_dead &= zero | ~has
            elif is_param:
                has = np.bincount(m.unit_of[m.unit_of >= 0], minlength=n) > 0
                if mask is None:
                    cons_dead &= ~has
                    continue
                _, zero = _unit_zero(mask, m, n)
                cons_seen |= has
                cons_dead &= zero | ~has
        return (prod_seen & prod_dead) | (cons_seen & cons_dead)

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        return np.where(self.dead(group, model), 0.0, 1.0)
