"""Sequential reconstruction: groups in graph order, each on the already-compacted prefix.

``reconstruct(analysis, plan, data)`` works on ``analysis.model`` *before* surgery, holding
every removed unit at zero (all its parameter positions: the producer's rows, norm entries,
consumer columns). That full-size model computes exactly what the compact model will compute
at the kept positions (see ``graphprune.verify``), so surgery afterwards only slices away
zeros and the usual verification still applies. For each group, in the order its consumers
run:

1. stream the calibration data through the original model and the current (partly compacted)
   model; at each consumer accumulate ``E[x x^T]`` and ``E[x x_o^T]`` (``SecondMoments``);
2. choose the group's units by greedy structured OBS on the consumers' output reconstruction
   error (``select.greedy_obs``), the number to remove taken from the plan;
3. write the consumers' ridge refit (kept columns, bias with the removed units' mean
   contribution folded in) and zero the removed units everywhere.

Errors therefore do not compound: a later layer is fitted to the original outputs from the
inputs the compact model really produces. Groups without a refittable consumer keep the plan's
choice. BatchNorm running statistics are then re-estimated on the calibration data
(``norms.reestimate_batchnorm``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.analysis import Analysis, Group, param_tensor
from graphprune.planning.calibration import batches, forward, model_device, split_batch, to_device
from graphprune.reconstruct.consumers import (
    Consumer,
    columns,
    consumers_of,
    kernel_size,
    rnn_layer_input,
    weight_matrix,
    write,
)
from graphprune.reconstruct.moments import SecondMoments
from graphprune.reconstruct.norms import reestimate_batchnorm
from graphprune.reconstruct.select import Problem, greedy_obs, make_problem, refit

DEFAULT_RIDGE = 1e-2


@dataclass
class ReconstructOptions:
    """``ridge``: damping relative to the mean diagonal of ``E[x x^T]``; ``batchnorm``: re-estimate
    BatchNorm statistics afterwards; ``max_batches``: calibration batches used per pass."""

    ridge: float = DEFAULT_RIDGE
    batchnorm: bool = True
    max_batches: int | None = None
    selection: str = "obs"  # "obs": choose units by reconstruction error; "plan": keep the plan's


@dataclass
class Reconstruction:
    chosen: dict[int, list[int]]  # group index -> removed units
    refit: list[str] = field(default_factory=list)  # consumer weights refit
    seconds: float = 0.0
    passes: int = 0
    batchnorm: bool = False  # BatchNorm statistics were re-estimated
    peak_bytes: int = 0  # largest statistics + solver state held at once (one group's)


def check_data(data: Any, example_input: Any) -> None:
    """Refuse data that cannot drive reconstruction before any work: missing, one-shot, empty,
    of another structure than the example input."""
    from graphprune.graph.inputs import normalize_inputs

    what = "reconstruct=True"
    if data is None:
        raise InputError(
            "reconstruct=True needs calibration data: pass data=<a list or DataLoader of model inputs "
            "or (inputs, target) pairs> (a few hundred samples are enough; no labels needed)."
        )
    if isinstance(data, Iterable) and iter(data) is data:
        raise InputError(
            "reconstruct=True streams the calibration data once per pruned group, so data must be "
            "re-iterable: pass a list or a DataLoader, not a generator or iterator."
        )
    first = next(iter(batches(data, what)))
    inputs, _ = split_batch(first)
    ea, ek = normalize_inputs(example_input)
    try:
        da, dk = normalize_inputs(inputs)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{what}: a calibration batch is not a model input ({exc})") from exc
    if len(da) != len(ea) or sorted(dk) != sorted(ek):
        raise InputError(
            f"{what}: calibration batches must have the example input's structure "
            f"({len(ea)} positional, keywords {sorted(ek)}), got {len(da)} positional, keywords "
            f"{sorted(dk)}. Yield inputs, or (inputs, target) pairs."
        )
    for a, b in zip([*ea, *(ek[k] for k in sorted(ek))], [*da, *(dk[k] for k in sorted(dk))]):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or (
            isinstance(a, torch.Tensor) and a.dim() != b.dim()
        ):
            raise InputError(
                f"{what}: a calibration input of shape {tuple(getattr(b, 'shape', ()))} does not match "
                f"the example input's {tuple(getattr(a, 'shape', ()))} (only the batch size may differ)."
            )
        if isinstance(b, torch.Tensor) and b.is_floating_point() and not torch.isfinite(b).all():
            raise InputError(f"{what}: the calibration data contains NaN or inf values.")


def execution_order(model: nn.Module, inputs: Any) -> dict[str, int]:
    """Module path -> index of its first call on ``inputs`` (the first calibration batch).

    This first run is also the last check of the data: a batch the model cannot take, or one
    that makes it produce NaN/inf, is refused here, before any statistic is taken.
    """
    from graphprune.graph.inputs import flatten_outputs

    order: dict[str, int] = {}
    handles = []

    def first_call(path: str):
        def hook(mod: nn.Module, args: Any) -> None:
            order.setdefault(path, len(order))
        return hook

    for path, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(first_call(path)))
    try:
        with torch.no_grad():
            outputs = flatten_outputs(forward(model, inputs))
    except Exception as exc:  # noqa: BLE001 - the user's data, the user's model: say which
        raise InputError(
            f"reconstruct=True: the model fails on the first calibration batch ({type(exc).__name__}: "
            f"{exc}). Calibration batches must be inputs like the example input (only the batch size "
            "may differ), or (inputs, target) pairs."
        ) from exc
    finally:
        for h in handles:
            h.remove()
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in outputs):
        raise InputError(
            "reconstruct=True: the model's outputs on the first calibration batch are not finite (NaN "
            "or inf); check the calibration data (scale, dtype) before reconstructing."
        )
    return order


def _first_inputs(data: Any, device: torch.device | None) -> Any:
    return split_batch(to_device(next(iter(batches(data, "reconstruct=True"))), device))[0]


def _augment(cols: torch.Tensor) -> torch.Tensor:
    return torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype, device=cols.device)], 1)


def _inputs_of(mod: nn.Module, args: tuple[Any, ...], layers: set[int]) -> dict[int, torch.Tensor]:
    """Augmented input columns per recurrent layer index (just 0 for Linear/Conv)."""
    out = {}
    if not args:
        return out
    for layer in layers:
        x = rnn_layer_input(mod, args, layer) if isinstance(mod, nn.RNNBase) else args[0]
        cols = columns(mod, x)
        if cols is not None:
            out[layer] = _augment(cols.double())
    return out


def collect(
    target: nn.Module, work: nn.Module, cons: list[Consumer], data: Any, max_batches: int | None
) -> SecondMoments:
    """Stream ``data`` through both models; accumulate each consumer's E[x x^T], E[x x_o^T]."""
    device = model_device(work)

    def runs() -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
        for batch in batches(data, "reconstruct=True", max_batches):
            inputs, _ = split_batch(to_device(batch, device))
            yield partial(forward, target, inputs), partial(forward, work, inputs)

    return collect_runs(target, work, cons, runs())


def collect_runs(
    target: nn.Module,
    work: nn.Module,
    cons: list[Consumer],
    runs: Iterable[tuple[Callable[[], Any], Callable[[], Any]]],
) -> SecondMoments:
    """Each consumer's E[x x^T], E[x x_o^T] over ``runs``: per batch, a call that runs ``target``
    (the original) and one that runs ``work`` on the same samples.

    ``collect`` feeds whole models with calibration batches; the checkpoint path feeds one
    decoder block with the activations the blocks before it produced (graphprune.surgery.
    checkpoint_calib), so both share this accumulation."""
    stats = SecondMoments()
    by_module: dict[str, list[Consumer]] = {}
    for c in cons:
        by_module.setdefault(c.module, []).append(c)
    pending: dict[str, list[dict[int, torch.Tensor]]] = {p: [] for p in by_module}

    def seen(path: str):
        layers = {c.layer for c in by_module[path]}

        def hook(mod: nn.Module, args: Any) -> None:
            pending[path].append(_inputs_of(mod, args, layers))
        return hook

    def used(path: str):
        layers = {c.layer for c in by_module[path]}

        def hook(mod: nn.Module, args: Any) -> None:
            if not pending[path]:
                return
            ys = pending[path].pop(0)
            xs = _inputs_of(mod, args, layers)
            for c in by_module[path]:
                if c.layer in xs and c.layer in ys:
                    stats.add(c.key, xs[c.layer], ys[c.layer])
        return hook

    handles = [target.get_submodule(p).register_forward_pre_hook(seen(p)) for p in by_module]
    handles += [work.get_submodule(p).register_forward_pre_hook(used(p)) for p in by_module]
    try:
        with torch.no_grad():
            for run_target, run_work in runs:
                for p in pending:
                    pending[p].clear()
                run_target()
                run_work()
    finally:
        for h in handles:
            h.remove()
    stats.all_reduce()
    return stats


def zero_removed(work: nn.Module, group: Group, removed: list[int], dead: dict[str, np.ndarray]) -> None:
    """Hold the removed units at zero in every parameter member; remember dead input columns."""
    params = {n for n, _ in work.named_parameters(remove_duplicate=False)}
    gone = np.isin(np.arange(group.num_units), removed)
    with torch.no_grad():
        for m in group.members:
            pos = np.flatnonzero((m.unit_of >= 0) & gone[np.maximum(m.unit_of, 0)])
            if not pos.size:
                continue
            if m.dim == 1:
                mask = dead.setdefault(m.name, np.zeros(m.unit_of.shape[0], dtype=bool))
                mask[pos] = True
            if m.name in params:
                t = param_tensor(work, m.name)
                t.index_fill_(m.dim, torch.as_tensor(pos, dtype=torch.long, device=t.device), 0)


def group_order(groups: list[Group], work: nn.Module, order: dict[str, int]) -> list[Group]:
    def first(g: Group) -> int:
        cons = consumers_of(g, work)
        paths = [c.module for c in cons] or [m.name.rpartition(".")[0] for m in g.members]
        return min((order.get(p, 1 << 30) for p in paths), default=1 << 30)

    return sorted(groups, key=lambda g: (first(g), g.index))


def _problem(c: Consumer, target: nn.Module, work: nn.Module, stats: SecondMoments,
             dead: dict[str, np.ndarray], ridge: float) -> Problem:
    """Consumer ``c``'s least-squares problem on its live columns (not removed by earlier groups)."""
    kk = kernel_size(work.get_submodule(c.module))
    col_unit = np.append(np.repeat(c.unit_of, kk), -1)  # the constant column is no unit
    dead_cols = np.repeat(dead.get(c.weight, np.zeros(len(c.unit_of), dtype=bool)), kk)
    live = np.flatnonzero(np.append(~dead_cols, c.bias is not None))
    w_orig = weight_matrix(target, c).double()
    if c.bias is not None:
        b_orig = param_tensor(target, c.bias).detach().double()
    else:
        b_orig = torch.zeros(w_orig.shape[0], dtype=torch.float64, device=w_orig.device)
    m = stats[c.key]
    return make_problem(m.gram, m.cross, torch.cat([w_orig, b_orig[:, None]], 1), col_unit, live, ridge)


def solve_group(
    g: Group,
    cons: list[Consumer],
    planned: list[int],
    target: nn.Module,
    work: nn.Module,
    statistics: Callable[[list[Consumer]], SecondMoments],
    dead: dict[str, np.ndarray],
    opts: ReconstructOptions,
    result: Reconstruction,
) -> list[int]:
    """Statistics (``statistics(cons)``), selection and refit for one group; returns its removed
    units.

    A consumer whose module never runs as a module (``nn.MultiheadAttention`` uses its
    ``out_proj`` weights functionally) gets no statistics and is left as it is.
    """
    stats = statistics(cons)
    result.passes += 1
    cons = [c for c in cons if c.key in stats]
    if not cons:
        return sorted(planned)
    problems = [_problem(c, target, work, stats, dead, opts.ridge) for c in cons]
    held = stats.nbytes + sum(p.hinv.numel() * 8 + p.w.numel() * 8 for p in problems)
    result.peak_bytes = max(result.peak_bytes, held)
    forced = planned if opts.selection == "plan" else None
    removed = greedy_obs(problems, g.num_units, len(planned), forced=forced)
    for p, c in zip(problems, cons):
        w = weight_matrix(work, c)
        weight, bias = refit(p, w.shape[1], w.shape[0], c.bias is not None)
        write(work, c, weight, bias)
        result.refit.append(c.weight)
    return removed


def reconstruct(
    analysis: Analysis,
    planned: dict[int, list[int]],
    data: Any,
    options: ReconstructOptions | None = None,
    progress: bool = False,
) -> Reconstruction:
    """Choose and refit group by group on ``analysis.model`` (in place); see the module docstring.

    ``planned``: group index -> units the plan would remove (only the count is used where the
    group has a refittable consumer).
    """
    opts = options or ReconstructOptions()
    t0 = time.perf_counter()
    work = analysis.model
    target = copy.deepcopy(work).eval()
    device = model_device(work)
    order = execution_order(work, _first_inputs(data, device))
    by_index = {g.index: g for g in analysis.groups}
    todo = group_order([by_index[i] for i, r in planned.items() if r], work, order)
    result = Reconstruction({})
    dead: dict[str, np.ndarray] = {}
    bar = _bar(len(todo), progress)
    for g in todo:
        cons = consumers_of(g, work)
        if cons:
            stats = partial(collect, target, work, data=data, max_batches=opts.max_batches)
            removed = solve_group(g, cons, planned[g.index], target, work, stats, dead, opts, result)
        else:
            removed = sorted(planned[g.index])
        result.chosen[g.index] = removed
        zero_removed(work, g, removed, dead)
        bar.update(1)
    bar.close()
    if opts.batchnorm and todo:
        result.batchnorm = reestimate_batchnorm(work, data, opts.max_batches) > 0
    result.seconds = time.perf_counter() - t0
    return result


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="reconstruct", unit="group", disable=not progress)
