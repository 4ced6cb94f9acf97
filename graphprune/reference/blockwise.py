"""Verification block by block: each repeated block of the compact model against the reference.

The whole-model check (verify.py) says *that* the outputs differ; on a 30-block decoder that
leaves 30 candidates, and a small error early on may grow or shrink on its way to the logits.
For models built from repeated blocks (the modules of an ``nn.ModuleList`` / ``nn.Sequential``
that perform residual adds: ``graph.blocks.find_blocks``), the compact model is checked piece
by piece instead, each piece started from the reference's own values:

1. The masked reference (verify.py) runs once on the original weights and records, for every
   block, the value entering it (the skip input of its first residual add: the residual stream)
   and the value leaving it, restricted to the kept positions (the compact layout).
2. The compact model runs once with hooks. Before block ``i`` runs, its residual-stream argument
   is compared with the reference's entering value (this checks what lies before the first
   block, or between two blocks) and then *replaced* by it; after the block runs, its output is
   compared with the reference's leaving value. Every block is thus checked on the same input
   the reference saw, so an error cannot hide behind (or be blamed on) the blocks before it.
   The compact model's outputs, computed from the last block's reference input, check the part
   after the blocks.
3. Each block's recorded values are dropped once it is checked, so at most the block
   boundaries are held (one hidden-state tensor per block, not every layer's activations).

Which argument is the residual stream is decided by value, not by position: among the block's
tensor arguments of the right shape and dtype, the one closest to the reference's entering
value (a block's skip input need not be its first argument). Blocks whose boundaries are not a
single value, whose kept positions are not a grid, or that the compact model does not have at
the same path are left out; with fewer than two blocks left, the caller keeps the whole-model
check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphprune.graph.analysis import Analysis
from graphprune.graph.blocks import residuals, residuals_by_module
from graphprune.graph.inputs import flatten_outputs, forward, normalize_inputs
from graphprune.graph.trace import no_cache
from graphprune.reference.masks import reference_masks
from graphprune.reference.run import Reference, compute_reference, kept_value, run_reference
from graphprune.reference.tolerance import relative_error


@dataclass(frozen=True)
class Span:
    """One repeated block as the verification sees it: its module and boundary values."""

    path: str  # module path, the same in the original and the compact model
    entry: Node  # the residual stream entering the block
    exit: Node  # the single value leaving it


@dataclass
class Piece:
    """One compared piece: what, its relative error and the tolerance it was held to."""

    label: str  # e.g. "model.layers.3" or "before model.layers.0"
    path: str  # the block the piece belongs to (for the groups pruned there)
    error: float
    tol: float
    noise: float | None = None  # the block's own float32 rounding error (float64 rerun), if it failed

    @property
    def ok(self) -> bool:
        return self.error <= self.tol


@dataclass
class BlockValues:
    """The reference at the block boundaries (compact layout), recorded by one reference run."""

    spans: list[Span]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def block_spans(analysis: Analysis) -> list[Span]:
    """The repeated blocks of the analysed model, in graph order (module docstring)."""
    graph = analysis.traced.program.graph
    model = analysis.model
    by_name = {n.name: n for n in graph.nodes}
    pos = {n: i for i, n in enumerate(graph.nodes)}
    spans: list[Span] = []
    nodes_in: dict[str, set[Node]] = {}  # module path -> the nodes it ran
    for n in graph.nodes:
        for path in _paths(n):
            nodes_in.setdefault(path, set()).add(n)
    # the modules performing residual adds (what find_blocks starts from; the rest of its work,
    # whether a block could be deleted, is not needed here)
    for path, adds in residuals_by_module(residuals(graph)).items():
        parent, _, last = path.rpartition(".")
        if not path or not last.isdigit() or not _is_list(model, parent):
            continue
        inside = nodes_in.get(path, set())
        exits = [n for n in inside if n.op == "call_function" and any(u not in inside for u in n.users)]
        entry = by_name.get(adds[0].skip.name)
        if len(exits) != 1 or entry is None or entry in inside:
            continue
        spans.append(Span(path, entry, exits[0]))
    # a block inside another block is checked as part of the outer one
    spans = [s for s in spans if not any(s.path.startswith(o.path + ".") for o in spans)]
    spans.sort(key=lambda s: pos[s.exit])
    return spans if len(spans) >= 2 else []


def _is_list(model: nn.Module, parent: str) -> bool:
    try:
        return isinstance(model.get_submodule(parent), (nn.ModuleList, nn.Sequential))
    except AttributeError:
        return False


def _paths(n: Node) -> set[str]:
    return {v[0] for v in (n.meta.get("nn_module_stack") or {}).values()}


def record_blocks(
    analysis: Analysis, removed: np.ndarray, original: nn.Module, example_input: Any, spans: list[Span]
) -> tuple[list[torch.Tensor], BlockValues]:
    """Run the masked reference once: (model outputs, the block boundary values)."""
    wanted = {s.entry for s in spans} | {s.exit for s in spans}
    outputs, interp = run_reference(
        analysis, reference_masks(analysis, removed), original, example_input, record=wanted
    )
    return outputs, boundary_values(interp, spans)


def reference_with_blocks(
    analysis: Analysis, removed: np.ndarray, original: nn.Module, example_input: Any, per_module: bool
) -> Reference:
    """``compute_reference`` that also records the block boundaries (for a reference computed
    before slicing, when the original weights will be gone by verification time)."""
    spans = block_spans(analysis)
    also = ({s.entry for s in spans} | {s.exit for s in spans}, lambda i: boundary_values(i, spans))
    return compute_reference(analysis, removed, original, example_input, per_module=per_module,
                             also=also if spans else None)


def boundary_values(interp: Any, spans: list[Span]) -> BlockValues:
    """The recorded entry/exit values of ``spans`` (kept positions); spans without a grid go."""
    values = BlockValues([])
    kept: dict[Node, torch.Tensor | None] = {}  # a block's exit is usually the next one's entry

    def once(node: Node) -> torch.Tensor | None:
        if node not in kept:
            kept[node] = kept_value(interp, node)
        return kept[node]

    for s in spans:
        x = once(s.entry)
        y = once(s.exit)
        if x is None or y is None:
            continue
        values.spans.append(s)
        values.inputs[s.path] = x
        values.outputs[s.path] = y
    return values


def copy_values(values: BlockValues | None) -> BlockValues | None:
    """A copy ``run_blockwise`` may empty (the tensors are shared, not copied)."""
    if values is None:
        return None
    return BlockValues(list(values.spans), dict(values.inputs), dict(values.outputs))


class _NoStream(Exception):
    """A block has no argument shaped like the reference's residual stream."""


def run_blockwise(
    small: nn.Module, example_input: Any, values: BlockValues, tol_of: Any
) -> tuple[list[torch.Tensor], list[Piece]] | None:
    """Run ``small`` once, each block on the reference's input (module docstring, step 2).

    ``tol_of(expected, err)`` is the tolerance an error ``err`` against one reference tensor is
    held to. Returns the model's outputs and every compared piece in order, or None when a block
    of ``values`` cannot be found or fed (the caller then compares whole-model outputs only).
    ``values`` is emptied as it goes.
    """
    try:
        mods = {s.path: small.get_submodule(s.path) for s in values.spans}
    except AttributeError:
        return None
    pieces: list[Piece] = []
    prev: list[str] = []
    busy: list[bool] = []  # inside a float64 rerun: the hooks stand aside

    def before(m: nn.Module, args: tuple, kwargs: dict, path: str) -> tuple[tuple, dict] | None:
        if busy:
            return None
        ref = values.inputs.pop(path, None)
        if ref is None:  # the block runs twice: not one value per boundary
            raise _NoStream(path)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        cands = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)
                 and tuple(t.shape) == tuple(ref.shape) and t.dtype == ref.dtype]
        if not cands:
            raise _NoStream(path)
        errs = {i: relative_error(leaves[i], ref.to(leaves[i].device)) for i in cands}
        best = min(cands, key=errs.__getitem__)
        label = f"before {path}" if not prev else f"between {prev[-1]} and {path}"
        pieces.append(Piece(label, path, errs[best], tol_of(ref, errs[best])))
        chosen = leaves[best]
        fed = ref.to(chosen.device).clone()
        leaves = [fed if t is chosen else t for t in leaves]
        return pytree.tree_unflatten(leaves, spec)

    def after(m: nn.Module, args: tuple, kwargs: dict, out: Any, path: str) -> None:
        if busy:
            return
        ref = values.outputs.pop(path, None)
        if ref is None:
            raise _NoStream(path)
        got = flatten_outputs(out)
        first = got[0] if got else None
        if first is None or tuple(first.shape) != tuple(ref.shape) or first.dtype != ref.dtype:
            err = float("inf")
        else:
            err = relative_error(first, ref.to(first.device))
        piece = Piece(path, path, err, tol_of(ref, err))
        if not piece.ok and first is not None:
            busy.append(True)
            try:
                piece.noise = block_noise(m, args, kwargs, first)
            finally:
                busy.pop()
        pieces.append(piece)
        prev.append(path)

    handles = []
    for path, mod in mods.items():
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k, path=path: before(m, a, k, path), with_kwargs=True))
        handles.append(mod.register_forward_hook(
            lambda m, a, k, o, path=path: after(m, a, k, o, path), with_kwargs=True))
    args, kwargs = normalize_inputs(example_input)
    try:
        with torch.no_grad(), no_cache(small):
            outs = flatten_outputs(forward(small, args, kwargs))
    except _NoStream:
        return None
    finally:
        for h in handles:
            h.remove()
    if len(prev) != len(mods):  # a block did not run (or ran twice): not the reference's order
        return None
    return outs, pieces


def block_noise(block: nn.Module, args: tuple, kwargs: dict, out32: torch.Tensor) -> float | None:
    """The relative error of ``block``'s float32 output against a float64 copy of the block on
    the same input: how much this block alone turns rounding into differences (verify.py's
    second chance, for one block instead of a float64 copy of the whole model). None when the
    block is not float32 or does not run in float64."""
    import copy

    if any(p.dtype != torch.float32 for p in block.parameters()):
        return None

    def to64(v: Any) -> Any:
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    try:
        block64 = copy.deepcopy(block).double()
        args64, kwargs64 = pytree.tree_map(to64, (args, kwargs))
        with torch.no_grad():
            out64 = flatten_outputs(block64(*args64, **kwargs64))
    except Exception:  # noqa: BLE001 - no float64 run, no excuse: the mismatch is reported
        return None
    if not out64 or tuple(out64[0].shape) != tuple(out32.shape):
        return None
    return relative_error(out32.double(), out64[0])


def describe_piece(piece: Piece, small: nn.Module, checked: int) -> str:
    """What a failing piece means, in words, for the error message."""
    if piece.label == piece.path:
        kind = type(small.get_submodule(piece.path)).__name__
        return (f"block {piece.path} ({kind}) is the first block that diverges: given the reference's "
                f"input, its output differs by relative error {piece.error:.3g} > {piece.tol:g} "
                f"({checked} block(s) before it agree)")
    where = "the part of the model before the first block" if piece.label.startswith("before") else \
        f"what runs {piece.label}"
    return (f"the residual stream entering block {piece.path} differs from the reference by relative "
            f"error {piece.error:.3g} > {piece.tol:g}: the difference arises in {where}")
