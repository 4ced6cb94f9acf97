"""Data-driven criteria: measured on calibration batches before scoring.

Gradients (``Taylor``, ``Hessian``) are stored per parameter element and activations
(``Activation``) per channel, so both can be *sliced* like the parameters themselves: that is
what lets ``Pruner`` accumulate them across steps that physically shrink the model (``remap``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import Group, param_tensor
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
from graphprune.planning.scoring import Importance, Magnitude, accumulate, per_position

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
                accumulate(total, m, per_position(s, m.dim, 0), False)
        return total


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter is reachable (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _gradients(
    model: nn.Module, batches_: Iterable[Any], loss_fn: LossFn | None, what: str
) -> Iterator[tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]]]:
    """The loop Taylor and Hessian share: per batch, the loss's gradients w.r.t. every parameter.

    Yields ``(params, grads)`` (``None`` where a parameter does not reach the loss); gradients
    are enabled only while the loop runs, and the model's own ``requires_grad`` flags restored.
    """
    device = model_device(model)
    with grads_enabled(model) as named:
        params = [p for _, p in named]
        for batch in batches_:
            inputs, target = split_batch(to_device(batch, device))
            loss = compute_loss(loss_fn, forward(model, inputs), target, what)
            yield params, torch.autograd.grad(loss, params, allow_unused=True)


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
        sums: dict[int, torch.Tensor] = {}
        n = 0
        what = "importance='taylor'"
        for params, grads in _gradients(model, batches(data, what, self.max_batches), loss_fn, what):
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
        sq: dict[int, torch.Tensor] = {}
        n = 0
        what = "importance='hessian'"
        samples = (s for batch in batches(data, what) for s in split_samples(batch))
        for params, grads in _gradients(model, itertools.islice(samples, self.max_samples), loss_fn, what):
            for p, g in zip(params, grads):
                if g is not None:
                    sq[id(p)] = sq[id(p)] + g.pow(2) if id(p) in sq else g.pow(2)
            n += 1
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
                    if accumulate(total, m, vals, False):
                        accumulate(seen, m, np.ones_like(vals), False)
            if seen.any():
                return np.divide(total, seen, out=np.zeros_like(total), where=seen > 0)
        return Magnitude(2)(group, model)
