"""Importance criteria: one score per unit of a group, aggregated over *all* its members.

A unit is every position removed together (a conv's output channel, the BN entries of that
channel, the next conv's input slice, ...). Scoring only the producer would ignore most of
what is removed, so every criterion here looks at every member tensor of the group.

Two kinds of criteria exist, behind one interface (``criterion(group, model) -> scores``,
lower scores are removed first):

* **weight-only** criteria (``l1``, ``l2``, ``random``, ``fpgm``, ``bn_scale``) read the
  model's tensors when called;
* **data-driven** criteria (``taylor``, ``hessian``, ``activation``, ``apoz``) first measure
  something on calibration batches in :meth:`Importance.prepare` - gradients or activations,
  stored per parameter element or per channel so they can be *sliced* like the parameters
  themselves. That is what lets :class:`graphprune.Pruner` accumulate them across pruning steps
  that physically shrink the model (:meth:`Importance.remap`).

Plain callables ``(group, model) -> scores`` keep working; an :class:`Importance` subclass is
only needed for criteria that must see data before scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import InputError, warn_user
from graphprune.graph.analysis import Group, param_tensor
from graphprune.graph.arrays import distinct
from graphprune.planning.calibration import (
    LossFn,
)
from graphprune.planning.measured import Activation, Hessian, Taylor
from graphprune.planning.scoring import Criterion, Importance, Magnitude, accumulate, per_position
from graphprune.planning.ties import has_ties, lexicographic

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(mod_name) if mod_name else model), attr
    except AttributeError:
        return None, attr


# ----------------------------------------------------------------------------------------------
# Weight-only criteria
# ----------------------------------------------------------------------------------------------


class RandomImportance(Importance):
    """A baseline: random scores, deterministic for a seed (and different for every group)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        return np.random.default_rng(self.seed + group.index).random(group.num_units)


def random_importance(seed: int = 0) -> Criterion:
    return RandomImportance(seed)


class BNScale(Importance):
    """Network slimming: |gamma| of the normalisation layers in the group.

    BatchNorm/GroupNorm/InstanceNorm (and LayerNorm/RMSNorm when hidden sizes are pruned) scale
    each channel by gamma; a channel whose gamma is ~0 contributes only its (removable) shift.
    Train with :func:`graphprune.bn_l1_penalty` to push unneeded gammas to zero first. A group
    without any normalisation layer falls back to L2 magnitude so it is still ranked sensibly.
    """

    name = "bn_scale"

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        total = np.zeros(group.num_units)
        found = False
        for m in group.members:
            mod, attr = _owner(model, m.name)
            if isinstance(mod, _NORMS) and attr == "weight" and isinstance(mod.weight, nn.Parameter):
                found |= accumulate(total, m, per_position(mod.weight, m.dim, 1), False)
        return total if found else Magnitude(2)(group, model)


class FPGM(Importance):
    """Filter pruning via geometric median: units close to all others are redundant.

    For every weight member (two or more dims) each unit is a vector (its slice, flattened);
    a unit's score is its summed Euclidean distance to every other unit of the group. The units
    nearest the geometric median are the ones the others can best replace, so they go first.
    Members are normalised by their mean and summed, like magnitude.
    """

    name = "fpgm"

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        total = np.zeros(group.num_units)
        params = dict(model.named_parameters(remove_duplicate=False))
        used = False
        for m in group.members:
            if m.name not in params:
                continue
            t = param_tensor(model, m.name).detach().float()
            if t.dim() < 2 or t.is_meta:
                continue
            sel = np.flatnonzero(m.unit_of >= 0)
            units = m.unit_of[sel]
            counts = np.bincount(units, minlength=group.num_units)
            if counts.min() == 0 or len(set(counts.tolist())) != 1:
                continue  # uneven units: no common vector space for this member
            order = sel[np.argsort(units, kind="stable")]
            moved = t.movedim(m.dim, 0)[torch.as_tensor(order)]
            vecs = moved.reshape(group.num_units, -1)
            dist = torch.cdist(vecs[None], vecs[None])[0].sum(1).double().cpu().numpy()
            mean = dist.mean()
            total += dist / mean if mean > 0 else dist
            used = True
        return total if used else Magnitude(2)(group, model)


# ----------------------------------------------------------------------------------------------
# Normalisers (fair comparison of scores across groups, for global ranking)
# ----------------------------------------------------------------------------------------------


class Normalized(Importance):
    """Wrap a criterion and rescale each group's scores (order inside a group is unchanged).

    ``how="lamp"``: LAMP (Lee et al., 2021): a unit's score divided by the sum of the scores
    of all units of its group at least as important as it; the most important unit of every
    group gets 1, so global ranking cannot empty a group whose scores are small in absolute
    terms. ``"mean"``, ``"max"``, ``"sum"``: divide by that statistic of the group.
    """

    def __init__(self, base: str | Criterion, how: str = "lamp") -> None:
        super().__init__()
        if how not in ("lamp", "mean", "max", "sum"):
            raise InputError(f"normaliser must be 'lamp', 'mean', 'max' or 'sum', got {how!r}")
        self.base = resolve(base)
        self.how = how
        inner = getattr(self.base, "name", getattr(self.base, "__name__", "custom"))
        self.name = "lamp" if how == "lamp" and inner == "l2" else f"{how}({inner})"
        self.needs_data = bool(getattr(self.base, "needs_data", False))
        self.needs_loss = bool(getattr(self.base, "needs_loss", False))

    @property  # type: ignore[override]
    def accumulate(self) -> bool:
        return bool(getattr(self.base, "accumulate", False))

    @accumulate.setter
    def accumulate(self, value: bool) -> None:
        if isinstance(getattr(self, "base", None), Importance):
            self.base.accumulate = value

    def prepare(self, model: nn.Module, data: Any = None, loss_fn: LossFn | None = None) -> None:
        prepare_criterion(self.base, model, data, loss_fn)

    def remap(self, plan: Any) -> None:
        if hasattr(self.base, "remap"):
            self.base.remap(plan)

    def reset(self) -> None:
        if hasattr(self.base, "reset"):
            self.base.reset()

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        s = np.maximum(scores_for(self.base, group, model), 0.0)
        if self.how == "lamp":
            order = np.argsort(s, kind="stable")
            tail = np.cumsum(s[order][::-1])[::-1]  # sum of the unit and all more important ones
            out = np.empty_like(s)
            out[order] = np.divide(s[order], tail, out=np.zeros_like(tail), where=tail > 0)
            return out
        d = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[self.how] if s.size else 0.0
        return s / d if d > 0 else s


def lamp(base: str | Criterion = "l2") -> Normalized:
    """LAMP-normalised ``base`` criterion (default L2 magnitude, as in the LAMP paper)."""
    return Normalized(base, "lamp")


# ----------------------------------------------------------------------------------------------
# Registry and resolution
# ----------------------------------------------------------------------------------------------

CRITERIA: dict[str, Callable[[], Criterion]] = {
    "l1": lambda: Magnitude(1),
    "l2": lambda: Magnitude(2),
    "random": lambda: RandomImportance(0),
    "fpgm": FPGM,
    "bn_scale": BNScale,
    "taylor": Taylor,
    "hessian": Hessian,
    "activation": lambda: Activation("mean"),
    "apoz": lambda: Activation("apoz"),
    "lamp": lambda: lamp("l2"),
}


def weight_only_criteria() -> list[str]:
    """Names of the registered criteria that score from the weights alone (no calibration data)."""
    return sorted(name for name, make in CRITERIA.items() if not getattr(make(), "needs_data", False))


def resolve(
    importance: str | Criterion, *, data: Any = None, loss_fn: Any = None, check_data: bool = False
) -> Criterion:
    """Turn a name or callable into a criterion; with ``check_data``, refuse early if data is missing."""
    if callable(importance):
        crit = importance
    elif isinstance(importance, str) and importance.lower() in CRITERIA:
        crit = CRITERIA[importance.lower()]()
    else:
        raise InputError(
            f"unknown importance {importance!r}: use one of {sorted(CRITERIA)} or a callable "
            "(group, model) -> one score per unit (lower scores are removed first)."
        )
    if check_data and getattr(crit, "needs_data", False) and data is None:
        name = getattr(crit, "name", importance)
        what = "data=<calibration batches>" + (
            " and loss_fn=<callable(output, target) -> loss>" if getattr(crit, "needs_loss", False) else ""
        )
        raise InputError(
            f"importance={name!r} is measured on calibration data: pass {what}, e.g. "
            f"compact(model, x, importance={name!r}, data=loader"
            + (", loss_fn=torch.nn.functional.cross_entropy)" if getattr(crit, "needs_loss", False) else ")")
            + ". Weight-only criteria ('l1', 'l2', 'fpgm', 'bn_scale', 'lamp', 'random') need no data."
        )
    return crit


def prepare_criterion(criterion: Criterion, model: nn.Module, data: Any = None, loss_fn: Any = None) -> None:
    """Let a data-driven criterion measure ``model`` (no-op for plain callables)."""
    prep = getattr(criterion, "prepare", None)
    if callable(prep) and (data is not None or getattr(criterion, "needs_data", False)):
        prep(model, data, loss_fn)


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
    if not np.isfinite(arr).all():
        raise InputError(_nonfinite_message(criterion, group, model))
    if has_ties(arr) and not isinstance(criterion, Magnitude):
        if arr.size > 1 and distinct(arr).size == 1 and not getattr(criterion, "quiet_ties", False):
            warn_user(
                f"importance {getattr(criterion, 'name', 'custom')!r} gives every unit of some groups the "
                "same score; their units are ranked by L2 magnitude instead of by position"
            )
        arr = lexicographic(arr, Magnitude(2)(group, model))
    return arr


def _nonfinite_message(criterion: Criterion, group: Group, model: nn.Module) -> str:
    """Why a group's scores are NaN/Inf, blaming what actually is: weights, data, or the callable."""
    head = f"importance returned non-finite scores for group {group.index} ({group.describe()})"
    bad = []
    for name in dict.fromkeys(m.name for m in group.members):
        t = param_tensor(model, name).detach()
        n = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if n:
            bad.append(f"{name} ({n} of {t.numel()} values)")
    if bad:
        modules = sorted({b.split(" ")[0].rpartition(".")[0] for b in bad})
        return (
            f"{head}: the model's weights hold NaN/Inf: {', '.join(bad[:6])}, and the scores are "
            "computed from them. Replace the non-finite values (a diverged training run? reload a "
            f"good checkpoint), or keep those modules whole: ignored_layers={modules!r}."
        )
    if getattr(criterion, "needs_data", False):
        return f"{head}; check the calibration data and loss (NaN/inf gradients or activations)."
    if isinstance(criterion, Importance):
        return f"{head}: the weights are finite but their scores overflowed; try importance='l1'."
    return f"{head}: the importance callable returned NaN/Inf; return one finite score per unit."
