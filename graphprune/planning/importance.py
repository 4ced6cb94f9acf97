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

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import Group, Member, param_tensor
from graphprune.planning.calibration import (
    LossFn,
    batches,
    compute_loss,
    forward,
    grads_enabled,
    model_device,
    split_batch,
    split_samples,
    to_device,
)

Criterion = Callable[[Group, nn.Module], Any]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def per_position(t: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """Sum of |t|^p over every dim but ``dim`` (p=0 means a plain sum of the values)."""
    t = t.detach().float()
    if t.is_meta:
        return np.ones(t.shape[dim])
    moved = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    if p == 0:
        return moved.sum(1).cpu().numpy()
    return (moved.abs().sum(1) if p == 1 else moved.pow(2).sum(1)).cpu().numpy().astype(np.float64)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(mod_name) if mod_name else model), attr
    except AttributeError:
        return None, attr


def _accumulate(total: np.ndarray, member: Member, vals: np.ndarray, normalise: bool) -> bool:
    """Add a member's per-position values to the unit totals; False if it has no unit positions."""
    sel = member.unit_of >= 0
    if not sel.any() or vals.shape[0] != member.unit_of.shape[0]:
        return False
    v = vals[sel]
    if normalise:
        mean = v.mean()
        v = v / mean if mean > 0 else v
    np.add.at(total, member.unit_of[sel], v)
    return True


class Importance:
    """Base class of criteria that may need calibration data.

    Subclasses implement ``__call__(group, model)``. Data-driven ones set ``needs_data`` and
    implement ``prepare`` (measure on the model about to be pruned) and ``remap`` (slice what
    they measured when the model shrinks). ``accumulate=True`` makes ``prepare`` *add* to what
    was measured before instead of replacing it (used by :class:`graphprune.Pruner`).
    """

    name = "custom"
    needs_data = False
    needs_loss = False

    def __init__(self) -> None:
        self.accumulate = False

    def prepare(self, model: nn.Module, data: Any = None, loss_fn: LossFn | None = None) -> None:
        """Measure what scoring needs on ``model`` (weight-only criteria need nothing)."""

    def remap(self, plan: Any) -> None:
        """Slice stored measurements after ``plan`` removed units (nothing stored: nothing to do)."""

    def reset(self) -> None:
        """Forget stored measurements."""

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# ----------------------------------------------------------------------------------------------
# Weight-only criteria
# ----------------------------------------------------------------------------------------------


class Magnitude(Importance):
    """L1 (p=1) or L2 (p=2) magnitude of every member slice of a unit, summed over members.

    Buffers (BN running statistics) say nothing about importance and are skipped, and so are
    biases/shifts (a large negative BN shift marks a channel that ReLU silences, not an important
    one) unless a group has nothing else. ``normalize_members=True`` divides each member by its
    mean first (so a large consumer matrix cannot drown a small producer); measured on three
    trained digits CNNs (tools/accuracy.py setting) it did worse - KL to the unpruned model right
    after compaction 1.52 vs 1.34 at ratio 0.3, 2.79 vs 2.38 at 0.5 - so plain sums are the
    default. Leaving shifts out lowered the same KL too (accuracy 43 % -> 52 % at 0.3).
    """

    def __init__(self, p: int = 2, normalize_members: bool = False) -> None:
        super().__init__()
        if p not in (1, 2):
            raise InputError(f"magnitude p must be 1 or 2, got {p!r}")
        self.p = p
        self.normalize_members = normalize_members
        self.name = f"l{p}"

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        params = dict(model.named_parameters(remove_duplicate=False))
        for with_shifts in (False, True):
            total = np.zeros(group.num_units)
            used = False
            for m in group.members:
                if m.name in params and (with_shifts or m.name.rpartition(".")[2] != "bias"):
                    vals = self.position_values(model, m.name, m.dim)
                    used |= _accumulate(total, m, vals, self.normalize_members)
            if used:
                return total
        return total

    def position_values(self, model: nn.Module, name: str, dim: int) -> np.ndarray:
        """Sum of |w|^p over every dim of tensor ``name`` but ``dim`` (overridden where the
        weights are read from elsewhere: ``compact_checkpoint`` reads them from the shards)."""
        return per_position(param_tensor(model, name), dim, self.p)


def magnitude(p: int) -> Criterion:
    """L1 (p=1) or L2 (p=2) magnitude (kept for the original functional API)."""
    return Magnitude(p)


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
                found |= _accumulate(total, m, per_position(mod.weight, m.dim, 1), False)
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
# Data-driven criteria: statistics stored per parameter element, sliceable like parameters
# ----------------------------------------------------------------------------------------------


class _ElementStats(Importance):
    """A statistic with the shape of each parameter, summed over a unit's positions.

    The values are in loss units (first- or second-order estimates of the loss change from
    removing the unit), so they are summed over members *without* per-member normalisation:
    that keeps them comparable across groups for global pruning.
    """

    needs_data = True
    needs_loss = True

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, torch.Tensor] = {}
        self.steps = 0

    def reset(self) -> None:
        self.stats = {}
        self.steps = 0

    def _measure(self, model: nn.Module, data: Any, loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, model: nn.Module, data: Any = None, loss_fn: LossFn | None = None) -> None:
        new = self._measure(model, data, loss_fn)
        if self.accumulate and self.stats:
            for name, val in new.items():
                old = self.stats.get(name)
                if old is not None and old.shape != val.shape:
                    raise GraphPruneError(
                        f"{self.name}: stored statistics of {name} have shape {tuple(old.shape)} but the "
                        f"model now has {tuple(val.shape)}; call remap(plan) after every shrink."
                    )
                self.stats[name] = val if old is None else old + val
        else:
            self.stats = new
        self.steps = self.steps + 1 if self.accumulate else 1

    def remap(self, plan: Any) -> None:
        for name, dims in plan.slices.items():
            if name in self.stats:
                t = self.stats[name]
                for dim, kept in sorted(dims.items()):
                    t = t.index_select(dim, torch.as_tensor(kept, dtype=torch.long, device=t.device))
                self.stats[name] = t

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        if not self.stats:
            raise InputError(
                f"importance {self.name!r} has no measurements: compact(..., data=..., loss_fn=...) "
                "measures them, or call prepare(model, data, loss_fn) first."
            )
        total = np.zeros(group.num_units)
        for m in group.members:
            s = self.stats.get(m.name)
            if s is not None:
                _accumulate(total, m, per_position(s, m.dim, 0), False)
        return total


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter is reachable (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


class Taylor(_ElementStats):
    """First-order Taylor: mean over calibration batches of |w * dL/dw|, summed over a unit.

    |w * g| estimates how much the loss changes when ``w`` is set to zero (Molchanov et al.,
    2019). The absolute value is taken per batch, before averaging, so that gradients of a
    converged model (which average to ~0 over the data) still carry signal.
    """

    name = "taylor"

    def __init__(self, max_batches: int | None = None) -> None:
        super().__init__()
        self.max_batches = max_batches

    def _measure(self, model: nn.Module, data: Any, loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sums: dict[int, torch.Tensor] = {}
        n = 0
        with grads_enabled(model) as named:
            params = [p for _, p in named]
            for batch in batches(data, "importance='taylor'", self.max_batches):
                inputs, target = split_batch(to_device(batch, device))
                loss = compute_loss(loss_fn, forward(model, inputs), target, "importance='taylor'")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        v = (p.detach() * g).abs()
                        sums[id(p)] = sums[id(p)] + v if id(p) in sums else v
                n += 1
        return {
            name: sums[pid] / n for pid, names in _aliases(model).items() if pid in sums for name in names
        }


class Hessian(_ElementStats):
    """Second order (Optimal Brain Damage): 0.5 * F_ii * w_i^2 with the empirical Fisher diagonal.

    F_ii is the mean over calibration *samples* of the squared per-sample gradient (batches are
    split into single samples for that: the square of a batch gradient is a different, biased
    estimate). ``max_samples`` bounds the cost (one backward pass per sample).
    """

    name = "hessian"

    def __init__(self, max_samples: int = 128) -> None:
        super().__init__()
        self.max_samples = max_samples

    def _measure(self, model: nn.Module, data: Any, loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sq: dict[int, torch.Tensor] = {}
        n = 0
        with grads_enabled(model) as named:
            params = [p for _, p in named]
            for batch in batches(data, "importance='hessian'"):
                for sample in split_samples(batch):
                    if n >= self.max_samples:
                        break
                    inputs, target = split_batch(to_device(sample, device))
                    loss = compute_loss(loss_fn, forward(model, inputs), target, "importance='hessian'")
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for p, g in zip(params, grads):
                        if g is not None:
                            sq[id(p)] = sq[id(p)] + g.pow(2) if id(p) in sq else g.pow(2)
                    n += 1
                if n >= self.max_samples:
                    break
        by_id = {id(p): p for _, p in model.named_parameters()}
        out = {}
        for pid, names in _aliases(model).items():
            if pid in sq:
                val = 0.5 * (sq[pid] / n) * by_id[pid].detach().pow(2)
                out.update({name: val for name in names})
        return out


# ----------------------------------------------------------------------------------------------
# Activation statistics (per channel, from forward hooks)
# ----------------------------------------------------------------------------------------------


def _activation_sites(mod: nn.Module, path: str) -> list[tuple[str, int, int, bool]]:
    """(param name, param dim, activation axis, is_input) for the channels a module sees.

    Input-side sites are the *consumers* of a unit (what the next layer actually receives,
    after BN and ReLU); output-side sites are producers, used when a group has no consumer.
    """
    pre = f"{path}." if path else ""
    w = getattr(mod, "weight", None)
    has_bias = isinstance(getattr(mod, "bias", None), torch.Tensor)
    out: list[tuple[str, int, int, bool]] = []
    if isinstance(mod, nn.Linear):
        out += [(pre + "weight", 1, -1, True), (pre + "weight", 0, -1, False)]
        out += [(pre + "bias", 0, -1, False)] if has_bias else []
    elif isinstance(mod, nn.modules.conv._ConvNd):
        cin, cout = (0, 1) if mod.transposed else (1, 0)
        if mod.groups == 1:
            out.append((pre + "weight", cin, 1, True))
        out.append((pre + "weight", cout, 1, False))
        out += [(pre + "bias", 0, 1, False)] if has_bias else []
    elif isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and isinstance(w, torch.Tensor):
        out += [(pre + "weight", 0, 1, False)] + ([(pre + "bias", 0, 1, False)] if has_bias else [])
    elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and isinstance(w, torch.Tensor) and w.dim() == 1:
        out += [(pre + "weight", 0, -1, False)] + ([(pre + "bias", 0, -1, False)] if has_bias else [])
    elif isinstance(mod, nn.Embedding):
        out.append((pre + "weight", 1, -1, False))
    return out


class Activation(Importance):
    """Activation statistics per channel from calibration batches (forward hooks).

    ``kind="mean"``: mean |activation| of the channel; ``kind="apoz"``: one minus the Average
    Percentage of Zeros (Hu et al., 2016) - a channel that is almost always zero after ReLU is
    removed first. Measured where the channel enters its consumers (Linear/Conv inputs), which
    is what the rest of the network actually sees; groups with no consumer module use the
    producer's output. Groups with no observed activation fall back to L2 magnitude.
    """

    needs_data = True

    def __init__(self, kind: str = "mean", max_batches: int | None = None) -> None:
        super().__init__()
        if kind not in ("mean", "apoz"):
            raise InputError(f"activation kind must be 'mean' or 'apoz', got {kind!r}")
        self.kind = kind
        self.name = "activation" if kind == "mean" else "apoz"
        self.max_batches = max_batches
        self.stats: dict[tuple[str, int], np.ndarray] = {}
        self.is_input: dict[tuple[str, int], bool] = {}
        self.steps = 0

    def reset(self) -> None:
        self.stats, self.is_input, self.steps = {}, {}, 0

    def _measure(self, model: nn.Module, data: Any) -> dict[tuple[str, int], np.ndarray]:
        sums: dict[tuple[str, int], torch.Tensor] = {}
        counts: dict[tuple[str, int], int] = {}
        handles = []
        kind = self.kind

        def reduce(a: torch.Tensor, axis: int) -> torch.Tensor:
            a = a.detach().float().movedim(axis, -1)
            a = a.reshape(-1, a.shape[-1])
            return a.abs().mean(0) if kind == "mean" else (a != 0).float().mean(0)

        def hook(module: nn.Module, args: Any, output: Any, sites=None) -> None:
            for name, dim, axis, is_input in sites:
                t = args[0] if is_input and args else output
                if not isinstance(t, torch.Tensor) or t.dim() == 0:
                    continue
                size = param_tensor(module, name.rpartition(".")[2]).shape[dim]
                if t.shape[axis] != size:
                    continue
                key = (name, dim)
                v = reduce(t, axis)
                sums[key] = sums[key] + v if key in sums else v
                counts[key] = counts.get(key, 0) + 1
                self.is_input[key] = is_input

        for path, mod in model.named_modules():
            sites = _activation_sites(mod, path)
            if sites:
                handles.append(
                    mod.register_forward_hook(lambda m, a, o, s=sites: hook(m, a, o, s))
                )
        device = model_device(model)
        try:
            with torch.no_grad():
                for batch in batches(data, f"importance={self.name!r}", self.max_batches):
                    inputs, _ = split_batch(to_device(batch, device))
                    forward(model, inputs)
        finally:
            for h in handles:
                h.remove()
        return {k: (sums[k] / counts[k]).double().cpu().numpy() for k in sums}

    def prepare(self, model: nn.Module, data: Any = None, loss_fn: LossFn | None = None) -> None:
        new = self._measure(model, data)
        if self.accumulate and self.stats:
            for key, val in new.items():
                old = self.stats.get(key)
                if old is not None and old.shape != val.shape:
                    raise GraphPruneError(
                        f"{self.name}: stored statistics of {key} do not match the model; "
                        "call remap(plan) after every shrink."
                    )
                self.stats[key] = val if old is None else old + val
        else:
            self.stats = new
        self.steps = self.steps + 1 if self.accumulate else 1

    def remap(self, plan: Any) -> None:
        for (name, dim), v in list(self.stats.items()):
            kept = plan.slices.get(name, {}).get(dim)
            if kept is not None:
                self.stats[(name, dim)] = v[np.asarray(kept, dtype=np.int64)]

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        if not self.stats:
            raise InputError(
                f"importance {self.name!r} has no measurements: compact(..., data=...) measures them, "
                "or call prepare(model, data) first."
            )
        for want_input in (True, False):
            total = np.zeros(group.num_units)
            seen = np.zeros(group.num_units)
            for m in group.members:
                key = (m.name, m.dim)
                if key in self.stats and self.is_input.get(key) == want_input:
                    vals = self.stats[key]
                    if _accumulate(total, m, vals, False):
                        _accumulate(seen, m, np.ones_like(vals), False)
            if seen.any():
                return np.divide(total, seen, out=np.zeros_like(total), where=seen > 0)
        return Magnitude(2)(group, model)


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
        raise InputError(
            f"importance returned non-finite scores for group {group.index} ({group.describe()}); "
            "check the calibration data and loss (NaN/inf gradients or activations)."
        )
    return arr
