"""Calibration at checkpoint scale: one decoder block in memory at a time.

``compact_checkpoint(src, dst, ratio, data=calib)`` reconstructs (``graphprune.reconstruct``)
without ever loading the model, with the sequential scheme SparseGPT, Wanda and FLAP use:

1. **prefix pass**: the model is built from config.json with its parameters on the meta device
   and its (small, computed) buffers real, e.g. rotary frequencies. Each calibration batch runs
   through it; a module outside the block stack is filled from the shards the first time it runs
   (the embeddings), and every decoder block is run on meta copies of its inputs. That records
   the first block's input activations and every block's other inputs (attention mask, position
   embeddings: per block, so models whose blocks differ in mask still work). The last block stops
   the run, so the final norm and the output layer are never read. The prefix modules go back to
   meta afterwards.
2. **per block** ``i``: the block is read from the shards (memory-mapped), zero biases are added
   where reconstruction needs them (as ``compact`` does), and a working copy made. Its groups are
   reconstructed in the order they run, exactly as ``reconstruct.run`` does on a whole model:
   statistics from the *original* block on the original activations and the *working* block on
   the compacted prefix's activations, greedy OBS, ridge refit, removed units zeroed. The refit
   weights go to a temporary safetensors file. Both activation streams then move through their
   block to become block ``i + 1``'s inputs, and the block is freed.

So every block is fitted on what the already compacted blocks before it really produce (errors
do not compound), which is what ``compact(..., reconstruct=True)`` does on the loaded model: the
two give the same plan and the same weights up to float rounding (``tests/test_checkpoint_calib.py``).
Memory: the two activation streams (samples x tokens x hidden, twice), one block twice (original
and working copy), one block's statistics; the prefix modules only during the prefix pass.

A group must lie inside one block (attention heads, MLP channels). Groups that span blocks (the
hidden size with ``prune_hidden=True``, head_dim pruning that couples every layer's rotary table)
are refused with a clear error before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import Group, param_tensor
from graphprune.planning.calibration import batches, forward, split_batch
from graphprune.reconstruct.biases import add_zero_biases
from graphprune.reconstruct.consumers import Consumer, consumers_of
from graphprune.reconstruct.run import (
    Reconstruction,
    ReconstructOptions,
    collect_runs,
    group_order,
    solve_group,
    zero_removed,
)


class Resident:
    """Weak references to every weight tensor this module materialises or copies, so the peak of
    what is alive at once can be checked (deterministically, unlike RSS)."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.peak = 0

    def track(self, tensors: Any) -> None:
        self.refs.extend(weakref.ref(t) for t in tensors)
        self.check()

    def alive(self) -> int:
        self.refs = [r for r in self.refs if r() is not None]
        tensors = {id(t): t for t in (r() for r in self.refs) if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def check(self) -> None:
        self.peak = max(self.peak, self.alive())


class ShardReader:
    """Tensors by model name, read from the checkpoint's shards (memory-mapped, kept open)."""

    def __init__(self, root: Path, location: dict[str, str], names: dict[str, str]) -> None:
        self.root = root
        self.where: dict[str, tuple[str, str]] = {}
        for key, shard in location.items():
            self.where.setdefault(key, (shard, key))
            self.where.setdefault(names.get(key, key), (shard, key))
        self.open: tuple[str, Any, Any] | None = None  # one shard mapped at a time: mapped pages count as RSS

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise GraphPruneError(f"no shard holds {name}, which calibration needs; are the checkpoint's "
                                  "tensor names those of the model class in config.json?")
        shard, key = self.where[name]
        if self.open is None or self.open[0] != shard:
            self.close()
            handle = safe_open(str(self.root / shard), framework="pt")
            self.open = (shard, handle, handle.__enter__())
        return self.open[2].get_tensor(key)

    def close(self) -> None:
        if self.open is not None:
            self.open[1].__exit__(None, None, None)
            self.open = None


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on meta and their buffers real (rotary tables and
    other computed buffers are not in the shards); parameters are moved as they are registered,
    so no weight is ever initialised."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialize(module: nn.Module, prefix: str, reader: ShardReader, resident: Resident,
                own: bool = True) -> list[tuple[nn.Module, str, Any]]:
    """Fill ``module``'s meta parameters and buffers from the shards (``own``: its own only, not
    its children's); returns what was replaced, for ``unmaterialize``."""
    before = []
    mods = [("", module)] if own else list(module.named_modules())
    for path, mod in mods:
        pre = f"{prefix}{path}." if path else prefix
        for store in (mod._parameters, mod._buffers):
            for attr, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if store is mod._buffers and attr in mod._non_persistent_buffers_set:
                    raise GraphPruneError(f"{pre}{attr} is a computed buffer the model left on meta; "
                                          "graphprune cannot calibrate this model class block by block")
                value = reader.get(pre + attr)
                before.append((mod, attr, t))
                store[attr] = nn.Parameter(value, requires_grad=False) if store is mod._parameters else value
                resident.track([store[attr]])
    return before


def unmaterialize(before: list[tuple[nn.Module, str, Any]]) -> None:
    for mod, attr, t in before:
        (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = t


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` of modules of one class holding most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, path, mod)
    if best is None:
        raise InputError("compact_checkpoint(data=...) calibrates block by block and found no list of "
                         "repeated blocks (an nn.ModuleList of one class) in this model")
    return best[1], best[2]


def _map(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise GraphPruneError("the decoder block's first input is not a tensor (hidden states); "
                              "graphprune cannot calibrate this model class block by block")
    return h


def _with_hidden(call: tuple[tuple[Any, ...], dict[str, Any]], h: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _first_tensor(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            raise GraphPruneError("a decoder block returned no hidden-state tensor first; graphprune "
                                  "cannot calibrate this model class block by block")
    return out


def run_block(block: nn.Module, call: tuple[tuple, dict], h: torch.Tensor) -> torch.Tensor:
    args, kwargs = _with_hidden(call, h)
    with torch.no_grad():
        return _first_tensor(block(*args, **kwargs))


class _Stop(Exception):
    """Raised after the last block: nothing after the stack is run (nor read)."""


@dataclass
class Inputs:
    """What the prefix pass recorded: per batch, the first block's input, and per block and batch
    the block's call (its hidden-state argument is replaced when the block is run)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)


def capture_inputs(model: nn.Module, stack_path: str, stack: nn.ModuleList, data: list[Any],
                   reader: ShardReader, resident: Resident) -> Inputs:
    """The prefix pass (see the module docstring)."""
    rec = Inputs(calls=[[] for _ in stack])
    last = len(stack) - 1
    filled: list[tuple[nn.Module, str, Any]] = []
    handles = []

    def pre(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            rec.calls[i].append((args, kwargs))
            if i == 0:
                rec.hidden.append(_hidden_of(args, kwargs))
            return _map(args, lambda t: t.to("meta")), _map(kwargs, lambda t: t.to("meta"))
        return hook

    def post(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if i == last:
                raise _Stop
            real = _hidden_of(*rec.calls[i][-1])
            return _map(out, lambda t: real if t.is_meta and t.shape == real.shape else t)
        return hook

    def fill(prefix: str):
        def hook(mod: nn.Module, args: Any) -> None:
            filled.extend(materialize(mod, prefix, reader, resident))
        return hook

    inside = {id(m) for m in stack.modules()}
    for path, mod in model.named_modules():
        if id(mod) not in inside and any(t is not None and t.is_meta for t in mod._parameters.values()):
            handles.append(mod.register_forward_pre_hook(fill(f"{path}." if path else "")))
    for i, blk in enumerate(stack):
        handles.append(blk.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(blk.register_forward_hook(post(i), with_kwargs=True))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # our own copy: a key/value cache would carry keys between runs
    try:
        for b, batch in enumerate(data):
            inputs, _ = split_batch(batch)
            try:
                with torch.no_grad():
                    forward(model, inputs)
            except _Stop:
                continue
            except GraphPruneError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's data: say which batch and why
                raise InputError(
                    f"calibration batch {b} does not fit the model ({type(exc).__name__}: {exc}). Batches "
                    "must be inputs like the example input (token ids below the vocabulary size, as "
                    "integers; only the batch size may differ)."
                ) from exc
            raise GraphPruneError(f"calibration batch {b} never reached the last block of {stack_path}; "
                                  "graphprune cannot calibrate this model class block by block")
    finally:
        for h in handles:
            h.remove()
        unmaterialize(filled)
    return rec


def _shell(path: str, block: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """A module holding only ``block`` at ``path``, so the analysis' parameter names resolve."""
    root = mod = root if root is not None else nn.Module()
    parts = path.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        mod.add_module(part, child)
        mod = child
    mod.add_module(parts[-1], block)
    return root


def groups_by_block(groups: list[Group], planned: dict[int, list[int]], stack_path: str,
                    n_blocks: int) -> list[list[Group]]:
    """The groups to remove units from, by the block that holds all their members; a group that
    spans blocks (or lies outside them) is refused."""
    out: list[list[Group]] = [[] for _ in range(n_blocks)]
    pre = f"{stack_path}."
    for g in groups:
        if not planned.get(g.index):
            continue
        where = {m.name[len(pre):].split(".", 1)[0] if m.name.startswith(pre) else None for m in g.members}
        if len(where) != 1 or None in where:
            names = sorted({m.name for m in g.members})[:3]
            raise InputError(
                f"compact_checkpoint(data=...) calibrates one block at a time, and group {g.index} "
                f"({', '.join(names)}, ...) spans several blocks or lies outside {stack_path}. Leave out "
                "prune_hidden=True / attention='head_dim', or list those layers in ignored_layers."
            )
        out[int(where.pop())].append(g)
    return out


def _order(shell: nn.Module, block: nn.Module, call: tuple[tuple, dict], h: torch.Tensor) -> dict[str, int]:
    order: dict[str, int] = {}

    def first_call(path: str):
        def hook(mod: nn.Module, args: Any) -> None:
            order.setdefault(path, len(order))
        return hook

    handles = [m.register_forward_pre_hook(first_call(p)) for p, m in shell.named_modules()]
    try:
        run_block(block, call, h)
    finally:
        for handle in handles:
            handle.remove()
    return order


@dataclass
class Calibrated:
    """The reconstruction's choice, and where its refit tensors were written."""

    rec: Reconstruction
    refit: dict[str, Path]  # tensor name -> temporary safetensors file holding it
    peak_resident_bytes: int


def calibrate_blocks(
    model: nn.Module, groups: list[Group], planned: dict[int, list[int]], data: list[Any],
    reader: ShardReader, opts: ReconstructOptions, scratch: Path, progress: bool,
) -> Calibrated:
    """Reconstruct block by block (module docstring); ``model`` is the calibration model
    (``params_on_meta``), ``groups`` the analysis' groups (names of the model with zero biases)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    resident = Resident()
    stack_path, stack = block_stack(model)
    by_block = groups_by_block(groups, planned, stack_path, len(stack))
    inputs = capture_inputs(model, stack_path, stack, data, reader, resident)
    orig = list(inputs.hidden)
    cur = list(inputs.hidden)
    rec = Reconstruction({})
    dead: dict[str, np.ndarray] = {}
    refit: dict[str, Path] = {}
    for i in tqdm(range(len(stack)), desc="calibrating", unit="block", disable=not progress):
        path = f"{stack_path}.{i}"
        target = copy.deepcopy(stack[i])
        materialize(target, f"{path}.", reader, resident, own=False)
        add_zero_biases(target)  # as compact does: the original and the refit both carry them
        resident.track(target.parameters())
        work = copy.deepcopy(target)
        resident.track(work.parameters())
        t_shell, w_shell = _shell(path, target), _shell(path, work)
        calls = inputs.calls[i]
        todo = by_block[i]
        if todo:
            order = _order(w_shell, work, calls[0], cur[0])
            todo = group_order(todo, w_shell, order)
        saved: list[str] = []
        for g in todo:
            cons = consumers_of(g, w_shell)
            removed = sorted(planned[g.index])
            if cons:
                removed = solve_group(g, cons, planned[g.index], t_shell, w_shell,
                                      partial(_statistics, target, work, calls, orig, cur, t_shell, w_shell),
                                      dead, opts, rec)
                saved += _refit_names(cons, rec)
            rec.chosen[g.index] = removed
            zero_removed(w_shell, g, removed, dead)
        if saved:
            file = scratch / f"block-{i}.safetensors"
            save_file({n: param_tensor(w_shell, n).detach().contiguous() for n in saved}, str(file))
            refit.update(dict.fromkeys(saved, file))
        for b, call in enumerate(calls):
            orig[b] = run_block(target, call, orig[b])
            cur[b] = run_block(work, call, cur[b])
        del target, work, t_shell, w_shell
        resident.check()
    rec.seconds = time.perf_counter() - t0
    return Calibrated(rec, refit, resident.peak)


def _refit_names(cons: list[Consumer], rec: Reconstruction) -> list[str]:
    done = set(rec.refit)
    return [n for c in cons if c.weight in done for n in (c.weight, c.bias) if n is not None]


def _statistics(target: nn.Module, work: nn.Module, calls: list[tuple[tuple, dict]], orig: list[torch.Tensor],
                cur: list[torch.Tensor], t_shell: nn.Module, w_shell: nn.Module, cons: list[Consumer]):
    runs = ((partial(run_block, target, call, orig[b]), partial(run_block, work, call, cur[b]))
            for b, call in enumerate(calls))
    return collect_runs(t_shell, w_shell, cons, runs)


class _Runner(nn.Module):
    """Holds one block at its path; ``runner(tensor(b))`` runs it on batch ``b``'s recorded call and
    hidden states, so a criterion that measures a whole model by forward hooks measures the block."""

    def __init__(self, path: str, block: nn.Module, calls: list[tuple[tuple, dict]],
                 hidden: list[torch.Tensor]) -> None:
        super().__init__()
        _shell(path, block, self)
        self.run = [block, calls, hidden]  # a plain list: not a second registration of the block

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        block, calls, hidden = self.run
        return run_block(block, calls[int(b)], hidden[int(b)])


def measure_blocks(model: nn.Module, criterion: Any, data: list[Any], reader: ShardReader,
                   progress: bool) -> int:
    """Activation criteria (``graphprune.planning.measured.Activation``) measured block by block on
    the original model: its ``stats`` / ``is_input`` end up as a whole-model ``prepare`` would set
    them (sites inside the blocks). Returns the peak weight bytes resident at once."""
    from tqdm.auto import tqdm

    resident = Resident()
    stack_path, stack = block_stack(model)
    inputs = capture_inputs(model, stack_path, stack, data, reader, resident)
    hidden = list(inputs.hidden)
    stats: dict[Any, Any] = {}
    is_input: dict[Any, bool] = {}
    index = [torch.tensor(b) for b in range(len(hidden))]
    for i in tqdm(range(len(stack)), desc="measuring", unit="block", disable=not progress):
        path = f"{stack_path}.{i}"
        block = copy.deepcopy(stack[i])
        materialize(block, f"{path}.", reader, resident, own=False)
        criterion.reset()
        criterion.prepare(_Runner(path, block, inputs.calls[i], hidden), index)
        stats.update(criterion.stats)
        is_input.update(criterion.is_input)
        hidden = [run_block(block, call, h) for call, h in zip(inputs.calls[i], hidden)]
        del block
        resident.check()
    criterion.stats, criterion.is_input, criterion.steps = stats, is_input, 1
    return resident.peak


def calibration_batches(data: Any, max_batches: int | None) -> list[Any]:
    """The calibration batches as a list (they are run once, in the prefix pass)."""
    return list(batches(data, "compact_checkpoint(data=...)", max_batches))
