"""Running the masked reference on the original weights, and comparing a compact model with it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphprune.graph.aliasing import storage_ptr, written_inputs
from graphprune.graph.analysis import Analysis, param_tensor
from graphprune.graph.inputs import flatten_outputs, forward, normalize_inputs
from graphprune.graph.trace import no_cache
from graphprune.reference.interpreter import MaskedInterpreter
from graphprune.reference.masks import Inexact, reference_masks
from graphprune.reference.tolerance import relative_error, tight_rtol, tolerance


def _flat_user_inputs(program: torch.export.ExportedProgram, example_input: Any) -> list[Any]:
    args, kwargs = normalize_inputs(example_input)
    spec = program.call_spec.in_spec
    try:
        kw_spec = spec.children()[1] if hasattr(spec, "children") else spec.children_specs[1]
        kwargs = {k: kwargs[k] for k in kw_spec.context} if kw_spec.context else kwargs
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return pytree.tree_flatten((tuple(args), kwargs))[0]


def _graph_inputs(analysis: Analysis, original: nn.Module, example_input: Any) -> list[Any]:
    program = analysis.traced.program
    user = iter(_flat_user_inputs(program, example_input))  # fresh copies (normalize_inputs)
    written = written_inputs(program)  # None: cannot tell, copy them all
    flat: list[Any] = []
    for spec in program.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            flat.append(next(user))
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            try:
                t = param_tensor(original, spec.target)
            except AttributeError:
                t = program.constants.get(spec.target)
                if t is None:
                    raise Inexact(f"cannot find the original value of {spec.target}") from None
            # what the graph writes into (graph.aliasing): never the user's. Otherwise only the
            # masking writes, and never into the user's parameters and buffers (``_protected``);
            # a constant may be a plain tensor attribute, which that set does not cover.
            if kind == "CONSTANT_TENSOR" or written is None or spec.arg.name in written:
                t = t.detach().clone()
            flat.append(t.detach() if isinstance(t, torch.Tensor) else t)
        else:
            raise Inexact(f"the traced graph has a {kind} input")
    return flat


def _protected(original: nn.Module) -> set[int]:
    """Storages of the user's parameters and buffers: the masking never writes into them (the
    example input needs no protection: every run gets fresh copies)."""
    ptrs = set()
    for t in [*original.parameters(), *original.buffers()]:
        p = storage_ptr(t)
        if p is not None:
            ptrs.add(p)
    return ptrs


def run_reference(
    analysis: Analysis,
    masks: tuple[dict[Node, Any], dict[Node, Any]],
    original: nn.Module,
    example_input: Any,
    record: set[Node] | None = None,
) -> tuple[list[torch.Tensor], MaskedInterpreter]:
    program = analysis.traced.program
    flat = _graph_inputs(analysis, original, example_input)
    interp = MaskedInterpreter(program.graph_module, *masks, _protected(original), record)
    with torch.no_grad():
        outs = interp.run(*flat, enable_io_processing=False)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    specs = program.graph_signature.output_specs
    user = [o for o, s in zip(outs, specs) if s.kind.name == "USER_OUTPUT"]
    try:
        tree = pytree.tree_unflatten(user, program.call_spec.out_spec)
        return flatten_outputs(tree), interp
    except Exception:  # noqa: BLE001 - structure mismatch: compare the flat tensors in order
        return [u for u in user if isinstance(u, torch.Tensor)], interp


@dataclass
class Reference:
    """The plan's reference: model outputs and, optionally, every module's output (compact layout).

    ``modules[path]`` holds the reference values leaving module ``path`` (first call), restricted
    to the kept positions, so they compare directly with the compact model's module outputs
    (None where the kept positions are not a grid). ``order`` is their position in the graph.
    """

    outputs: list[torch.Tensor]
    rtol: float | None = None  # the tight tolerance of a small model (``tight_rtol``), else default
    modules: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)
    blocks: Any = None  # the block boundary values (blockwise.BlockValues) when asked for


def compute_reference(
    analysis: Analysis,
    removed: np.ndarray,
    original: nn.Module,
    example_input: Any,
    *,
    per_module: bool = False,
    also: tuple[set[Node], Callable[[MaskedInterpreter], Any]] | None = None,
) -> Reference:
    """Run the masked reference once (see module docstring); ``per_module`` also keeps layer outputs.

    ``also = (nodes, read)`` records ``nodes`` too and keeps ``read(interpreter)`` as
    ``Reference.blocks`` (verification block by block: reference/blockwise.py).
    """
    masks = reference_masks(analysis, removed)
    graph = analysis.traced.program.graph
    outs_of = module_outputs(graph) if per_module else {}
    wanted = {n for nodes in outs_of.values() for n in nodes} | (also[0] if also else set())
    outputs, interp = run_reference(analysis, masks, original, example_input, record=wanted)
    ref = Reference(outputs, rtol=tight_rtol(original, example_input))
    if also:
        ref.blocks = also[1](interp)
    index = {n: i for i, n in enumerate(graph.nodes)}
    for path, nodes in outs_of.items():
        views = []
        for node in nodes:
            views.append(kept_value(interp, node))
        if nodes:
            ref.modules[path] = views
            ref.order[path] = index[nodes[0]]
    return ref


def kept_value(interp: MaskedInterpreter, node: Node) -> torch.Tensor | None:
    """A recorded value restricted to the kept positions (compact layout); None if not a grid."""
    value = interp.values.get(node)
    if not isinstance(value, torch.Tensor):
        return None
    return kept_view(value, interp._keep(node, None, value))


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float | None) -> tuple[bool, float]:
    if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
        return False, math.inf
    err = relative_error(got, expected.to(got.device))
    return err <= tolerance(expected, rtol), err


def first_mismatch(
    reference: Reference, small: nn.Module, example_input: Any, rtol: float | None = None
) -> tuple[str, float] | None:
    """None if ``small``'s outputs match the reference; else ``(first differing layer, its error)``.

    The layer is the module (in graph order) whose output first differs from the reference;
    ``""`` when outputs differ but no module output could be compared.
    """
    matched, wrong = compare(reference, small, example_input, rtol, layers=False)
    return None if matched else wrong


def compare(
    reference: Reference, small: nn.Module, example_input: Any, rtol: float | None = None,
    layers: bool = True,
) -> tuple[bool, tuple[str, float] | None]:
    """One run of ``small``: whether its outputs match the reference, and the first layer whose
    output differs (``("", worst output error)`` when outputs differ and no layer could be
    compared; None when nothing differs).

    With ``layers`` the module outputs are compared even when the model's outputs match: later
    layers can damp a wrong layer's error below the tolerance (a softmax near uniform hides
    heads split at the wrong size).
    """
    recorded: dict[str, list[torch.Tensor]] = {}
    handles = []
    if reference.modules:
        for path, mod in small.named_modules():
            if path in reference.modules:

                def hook(m: nn.Module, a: Any, out: Any, path: str = path) -> None:
                    recorded.setdefault(path, flatten_outputs(out))

                handles.append(mod.register_forward_hook(hook))
    try:
        got = small_outputs(small, example_input)
    except Exception:  # noqa: BLE001 - a model that does not run matches nothing
        return False, ("", math.inf)
    finally:
        for h in handles:
            h.remove()
    rtol = reference.rtol if rtol is None else rtol
    results = [_close(g, e, rtol) for g, e in zip(got, reference.outputs)]
    matched = len(got) == len(reference.outputs) and all(ok for ok, _ in results)
    if matched and not layers:
        return True, None
    worst = max((err for _, err in results), default=math.inf)
    for path in sorted(reference.modules, key=reference.order.__getitem__):
        mine = recorded.get(path)
        refs = reference.modules[path]
        if not mine or len(mine) != len(refs):
            continue
        for g, e in zip(mine, refs):
            if e is None or tuple(e.shape) != tuple(g.shape) or e.dtype != g.dtype:
                continue
            ok, err = _close(g, e, rtol)
            if not ok:
                return matched, (path, err)
    return matched, (None if matched else ("", worst))


def reference_outputs(
    analysis: Analysis, removed: np.ndarray, original: nn.Module, example_input: Any
) -> list[torch.Tensor]:
    """The outputs the compact model must produce: the masked original program (see module doc)."""
    return run_reference(analysis, reference_masks(analysis, removed), original, example_input)[0]


def on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def small_outputs(small: nn.Module, example_input: Any) -> list[torch.Tensor]:
    args, kwargs = normalize_inputs(example_input)
    with torch.no_grad(), no_cache(small):
        return flatten_outputs(forward(small, args, kwargs))


def module_outputs(graph: torch.fx.Graph) -> dict[str, list[Node]]:
    """For each module path (first call only): the graph values that leave the module."""
    inside: dict[str, set[Node]] = {}
    order: dict[Node, int] = {}
    for i, node in enumerate(graph.nodes):
        order[node] = i
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            path = entry[0] if isinstance(entry, tuple) else str(entry)
            if "@" in str(key):
                continue
            inside.setdefault(path, set()).add(node)
    outs: dict[str, list[Node]] = {}
    for path, nodes in inside.items():
        leaving = [n for n in nodes if n.op == "call_function" and any(u not in nodes for u in n.users)]
        outs[path] = sorted(leaving, key=order.__getitem__)
    return outs


def kept_view(value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The reference value restricted to kept positions (compact layout), or None if not a grid.

    ``keep`` broadcasts to ``value``; it is read at its own (broadcast) shape, not expanded to
    the value's: a dim it broadcasts along is wholly kept or wholly removed, and expanding it
    made every recorded value cost reductions over its full size."""
    if keep is None:
        return value
    keep = keep.reshape((1,) * (value.dim() - keep.dim()) + tuple(keep.shape))
    out = value
    outer = torch.ones((1,) * keep.dim(), dtype=torch.bool, device=keep.device)
    for d in range(keep.dim()):
        rest = [e for e in range(keep.dim()) if e != d]
        k_d = keep.amax(dim=rest, keepdim=True) if rest else keep
        outer = outer & k_d
        index = torch.nonzero(k_d.reshape(-1)).reshape(-1).to(out.device)
        if keep.shape[d] == 1 and value.shape[d] != 1:  # broadcast: all of this dim, or none of it
            index = torch.arange(value.shape[d], device=out.device) if index.numel() else index
        out = out.index_select(d, index)
    if not torch.equal(outer.expand(keep.shape), keep):
        return None
    return out
