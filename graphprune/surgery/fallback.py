"""What to do when the user's class cannot run at the new widths.

Surgery changes tensors and the attributes the graph shows were used as sizes. A module that
reads a size from somewhere graphprune cannot change (timm's ``B, N, C = x.shape`` then
``reshape(B, N, C)`` merges heads back into the *input* width) fails after head pruning. Four
answers, chosen with ``fallback=``:

* ``"freeze"`` (default): first try to rewrite only the failing submodules as graphs of their own
  (``rewrite_fallback.py``, kept where verified exact: the user's class with everything pruned);
  otherwise find the module where the forward fails, keep every module of the same
  Python class whole (as if in ``ignored_layers``: same code, same failure) and plan again with
  the same options; repeat a few rounds. The user gets their own class back, less pruned, with a
  warning naming what was kept whole and why.
* ``"whole"``: the same without trying the rewrite (modules kept whole, as before the rewrite).
* ``"graph"``: everything pruned, returned as an fx GraphModule built from the torch.export
  program (re-exported with a dynamic batch dimension where that works and checks out).
* ``"error"``: raise GraphPruneError naming the module and the fix.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import GraphPruneError, InputError, warn_user
from graphprune.graph.inputs import flatten_outputs, forward, normalize_inputs
from graphprune.graph.trace import no_cache, quiet_torch_logs

FALLBACKS = {
    "freeze": "rewrite the modules that cannot run smaller as graphs where that is exact, else keep "
    "them whole (and every module of their class); the result is your own class",
    "whole": "keep the modules that cannot run smaller whole (and every module of their class), "
    "without trying a rewrite; the result is your own class",
    "graph": "prune everything and return an fx GraphModule built from the traced program",
    "error": "raise GraphPruneError naming the module that cannot run smaller",
}
MAX_ROUNDS = 6  # each round freezes at least one more module class; real models need one or two

FIX = (
    "make its forward read sizes from its own attributes (which graphprune updates) or from the "
    "tensors it computes, e.g. reshape(B, N, -1) instead of reshape(B, N, C) with C taken from the "
    "input"
)


def check_fallback(value: Any) -> str:
    """Refuse an unknown ``fallback`` with the list of valid ones."""
    if not isinstance(value, str) or value not in FALLBACKS:
        modes = "; ".join(f"{k!r}: {v}" for k, v in FALLBACKS.items())
        raise InputError(f"fallback must be one of {modes}. Got {value!r}.")
    return value


@dataclass
class Failure:
    """Why and where the compact model failed on the example input."""

    problem: str  # the exception's first line, or the output-shape mismatch
    stack: list[str]  # module paths active at the failure, outermost first ("" = the root)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def output_shapes(model: nn.Module, example_input: Any) -> list[tuple[int, ...]]:
    args, kwargs = normalize_inputs(example_input)
    with torch.no_grad(), no_cache(model):
        return [tuple(t.shape) for t in flatten_outputs(forward(model, args, kwargs))]


class Watch:
    """While active (``with Watch(model) as w``): the module paths running (``w.stack``; what is
    left after an exception is where it was raised, outermost first) and, once the model has
    returned, its output shapes (``w.shapes``; None if it did not return)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self.shapes: list[tuple[int, ...]] | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> Watch:
        def leave(module: nn.Module, args: Any, output: Any) -> None:
            self.stack.pop()
            if module is self.model and not self.stack:
                self.shapes = [tuple(t.shape) for t in flatten_outputs(output)]

        for path, mod in self.model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, p=path: self.stack.append(p)))
            self.handles.append(mod.register_forward_hook(leave))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def find_failure(model: nn.Module, example_input: Any, expected: list[tuple[int, ...]]) -> Failure | None:
    """Run ``model``; None if it gives the expected output shapes, else what failed and where.

    Forward pre-hooks push each module's path and forward hooks pop it; an exception skips the
    pops, so the stack left over is the chain of modules running when it was raised.
    """
    with Watch(model) as watch:
        try:
            got = output_shapes(model, example_input)
        except Exception as exc:  # noqa: BLE001 - the failure and its location are what we want
            return Failure(_first_line(exc), list(watch.stack) or [""])
    return None if got == expected else Failure(f"output shapes {got} != {expected}", [""])


def _is_torch_class(mod: nn.Module) -> bool:
    """torch's own modules size themselves from their weights: a failure there is the caller's."""
    return type(mod).__module__.split(".")[0] == "torch"


def culprit(model: nn.Module, stack: list[str], frozen_classes: set[type]) -> str | None:
    """The innermost module of the failure stack that freezing could fix, or None.

    Skips torch's own modules (an nn.Linear fed the wrong width is not at fault), the root
    (freezing it would prune nothing) and classes already frozen (freezing them again changes
    nothing: the fault must then lie with the module that calls them).
    """
    for path in reversed(stack):
        if not path:
            continue
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if not _is_torch_class(mod) and type(mod) not in frozen_classes:
            return path
    return None


def same_class(model: nn.Module, cls: type) -> list[str]:
    """Paths of every module of exactly ``cls``: the same code fails the same way."""
    return [p for p, m in model.named_modules() if p and type(m) is cls]


@dataclass
class Frozen:
    """One round of freezing: the class, the module where it failed, why, and all its paths."""

    cls: type
    path: str
    problem: str
    paths: list[str]


def describe(frozen: list[Frozen]) -> str:
    parts = []
    for f in frozen:
        shown = ", ".join(f.paths[:6]) + (f" and {len(f.paths) - 6} more" if len(f.paths) > 6 else "")
        parts.append(f"{f.cls.__name__} ({shown}): {f.path!r} fails with {f.problem}")
    return "; ".join(parts)


def freeze_warning(model_cls: str, frozen: list[Frozen]) -> str:
    names = ", ".join(sorted({f.cls.__name__ for f in frozen}))
    return (
        f"graphprune: the compact model of class {model_cls} cannot run at the new sizes with every "
        f"module pruned, so these modules were kept whole (as if in ignored_layers) and the rest "
        f"pruned: {describe(frozen)}. To get {names} pruned too, {FIX}; or pass fallback='graph' "
        "for an fx GraphModule with everything pruned."
    )


def error_message(model_cls: str, failure: Failure, path: str | None, model: nn.Module) -> str:
    where, ignore = "", "..."
    if path is not None:
        cls = type(model.get_submodule(path))
        where = f" in {cls.__name__} {path!r}"
        ignore = ", ".join(repr(p) for p in same_class(model, cls))
    elif failure.stack and failure.stack[-1]:
        where = f" in {failure.stack[-1]!r}"
    return (
        f"the compact model of class {model_cls} cannot run at the new sizes{where}: {failure.problem}. "
        f"To prune it, {FIX}; or pass ignored_layers=[{ignore}] to keep that code whole, "
        "fallback='freeze' to let graphprune do that, or fallback='graph' for an fx GraphModule."
    )


def restrict_plan(analysis: Any, plan: Any, prefixes: list[str]) -> Any:
    """A copy of ``plan`` that keeps every unit touching a tensor under ``prefixes``.

    The same as planning again with those modules in ``ignored_layers`` when each group is cut
    on its own (a uniform or per-group ratio, ``round_to``, the target search's per-group
    counts): freezing a module freezes whole units, the other groups' choices do not depend on it.
    Global ranking would move the budget elsewhere; callers that use it re-plan instead.
    """
    from graphprune.planning.plan import scale_entries, slices_of

    removed = np.array(plan.removed_class, copy=True)
    cls = analysis.unit_class
    hit = np.zeros_like(removed)
    for (name, _dim), ids in analysis.coupler.param_ids.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            hit[cls[ids]] = True
    removed &= ~hit
    new = copy.deepcopy(plan)
    new.slices, new.shapes, new.attr_updates = slices_of(analysis, removed), {}, []
    unit_to_class = {v: c for c, v in analysis.class_unit.items()}
    for g in new.groups:
        g.removed = [u for u in g.removed if not hit[unit_to_class.get((g.index, u), 0)]]
    new.scales = scale_entries(analysis, removed)
    new.removed_class = removed
    return new


# ------------------------------------------------------------------------------------------
# fallback="graph": the traced program with the new constants and the sliced weights
# ------------------------------------------------------------------------------------------


def _patched_graph(
    program: torch.export.ExportedProgram, by_name: dict[str, tuple], plan: Any, work: nn.Module
) -> torch.fx.GraphModule:
    from graphprune.graph.analysis import param_tensor
    from graphprune.surgery.slicing import set_tensor

    with warnings.catch_warnings():  # torch's own pytree deprecation noise while copying
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(program.module())
    own = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.name in by_name:  # keep this graph's own Node objects, take the new constants
            node.args = tuple(
                old if isinstance(old, torch.fx.Node) else torch.fx.node.map_arg(new, lambda n: own[n.name])
                for old, new in zip(node.args, by_name[node.name], strict=True)
            )
    gm.recompile()
    for name in plan.slices:
        set_tensor(gm, name, param_tensor(work, name).detach().clone())
    return gm


def _batch_of(example_input: Any) -> int | None:
    args, kwargs = normalize_inputs(example_input)
    tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        return None
    return int(tensors[0].shape[0])


def _dynamic_shapes(example_input: Any, batch: int) -> tuple[tuple, dict] | None:
    """dim 0 of every tensor input whose first size is the batch marks one shared batch Dim."""
    args, kwargs = normalize_inputs(example_input)
    dim = torch.export.Dim("batch")
    spec = lambda t: {0: dim} if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else None  # noqa: E731
    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def _grown(example_input: Any, batch: int, extra: int) -> Any:
    """The example input with its first ``extra`` samples appended along the batch dimension."""
    def grow(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch:
            return torch.cat([t, t[:extra]])
        return t

    args, kwargs = normalize_inputs(example_input)
    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _run(model: nn.Module, inputs: tuple[tuple, dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(model(*inputs[0], **inputs[1]))


def _sym_free(nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    return [n for n in nodes if n.op == "call_function" and "sym" not in str(n.target)]


def dynamic_batch_graph(analysis: Any, plan: Any, changes: dict, work: nn.Module, example_input: Any,
                        static: nn.Module) -> tuple[nn.Module | None, str]:
    """The graph fallback re-exported with a dynamic batch dimension, or (None, why not).

    The original (unpruned) model is exported again with ``Dim("batch")`` on dim 0 of the inputs;
    the new constants found on the static program are carried over node by node (same ops in
    the same order) at the positions where they changed, where the dynamic program still holds
    the same literal. The result must match the static graph on the example input and give, on
    the example grown by one sample, the example's outputs plus one more row in each output.
    """
    batch = _batch_of(example_input)
    if batch is None or batch < 2:
        return None, "the example input's batch is below 2 (torch.export specialises sizes 0 and 1)"
    dyn_args, dyn_kwargs = _dynamic_shapes(example_input, batch)
    args, kwargs = normalize_inputs(example_input)
    src = _restored(work, plan)
    try:
        with warnings.catch_warnings(), no_cache(src), quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                src, args, kwargs, dynamic_shapes={**_arg_names(src, dyn_args), **dyn_kwargs}, strict=False
            )
    except Exception as exc:  # noqa: BLE001
        return None, f"the re-export with a dynamic batch failed ({_first_line(exc)})"
    # pair the nodes by aligning the op sequences: the dynamic program may hold a few more ops
    # (a full slice ``x[:, 0]`` elided at a static batch stays when the batch is symbolic)
    static_nodes = _sym_free(list(analysis.traced.program.graph.nodes))
    dyn_nodes = _sym_free(list(program.graph.nodes))
    matcher = difflib.SequenceMatcher(
        None, [str(n.target) for n in static_nodes], [str(n.target) for n in dyn_nodes], autojunk=False
    )
    blocks = matcher.get_matching_blocks()
    pairs = {static_nodes[b.a + k]: dyn_nodes[b.b + k] for b in blocks for k in range(b.size)}
    by_name: dict[str, tuple] = {}
    for node, new_args in changes.items():
        dyn = pairs.get(node)
        if dyn is None:
            return None, f"no dynamic counterpart of {node.name}"
        merged = _merge(node.args, new_args, dyn.args)
        if merged is None:
            return None, f"the changed sizes of {node.name} are symbolic in the dynamic program"
        by_name[dyn.name] = merged
    try:
        gm = _patched_graph(program, by_name, plan, work)
        ref = _run(static, (args, kwargs))
        got = _run(gm, (args, kwargs))
        if len(ref) != len(got) or any(not torch.equal(a, b) for a, b in zip(ref, got)):
            return None, "the dynamic-batch graph does not match the static one on the example input"
        grown = _run(gm, _grown(example_input, batch, 1))
        for a, b in zip(got, grown, strict=True):
            if b.shape[:1] != (batch + 1,) or b.shape[1:] != a.shape[1:] or not torch.allclose(
                b[:batch], a, rtol=1e-5, atol=1e-6
            ):
                return None, "the dynamic-batch graph gives different rows at another batch size"
    except Exception as exc:  # noqa: BLE001
        return None, f"the dynamic-batch graph fails ({_first_line(exc)})"
    return gm, ""


def _arg_names(model: nn.Module, specs: tuple) -> dict[str, Any]:
    """Name the positional specs after forward's parameters (export takes keyword specs by name)."""
    import inspect

    names = [p for p in inspect.signature(model.forward).parameters][: len(specs)]
    return dict(zip(names, specs, strict=True))


def _restored(work: nn.Module, plan: Any) -> nn.Module:
    """A copy of the compact model at the original sizes, for tracing only.

    Export needs shapes, not values (the traced graph does not depend on them), and the original
    weights may already be gone (surgery slices the analysis' Parameters in place): sliced
    tensors come back as zeros of their original shapes, updated attributes get their old values.
    """
    from graphprune.planning.plan import AttrUpdate
    from graphprune.surgery.slicing import apply_attr_updates, set_tensor

    src = copy.deepcopy(work)
    apply_attr_updates(src, [AttrUpdate(u.module, u.attr, u.new, u.old) for u in reversed(plan.attr_updates)])
    for name, shape in plan.shapes.items():
        from graphprune.graph.analysis import param_tensor

        old = param_tensor(src, name)
        set_tensor(src, name, torch.zeros(shape, dtype=old.dtype, device=old.device))
    return src


def _merge(static_old: Any, static_new: Any, dyn: Any) -> Any:
    """Put ``static_new``'s constants where they differ from ``static_old`` into ``dyn``; None if a
    changed position is not the same literal in ``dyn``."""
    if isinstance(static_old, (list, tuple)):
        if not isinstance(dyn, (list, tuple)) or not isinstance(static_new, (list, tuple)):
            return None
        if len(static_old) != len(dyn) or len(static_new) != len(dyn):
            return None
        out = []
        for o, n, d in zip(static_old, static_new, dyn, strict=True):
            m = _merge(o, n, d)
            if m is None and not (o is None and n is None and d is None):
                return None
            out.append(m)
        return type(dyn)(out)
    if static_old == static_new and not isinstance(static_old, torch.fx.Node):
        return dyn
    if isinstance(static_old, torch.fx.Node):
        return dyn
    return static_new if dyn == static_old and not isinstance(dyn, torch.fx.Node) else None


def graph_fallback(analysis: Any, plan: Any, changes: dict, work: nn.Module, example_input: Any,
                   failure: Failure, *, why_not_freeze: str = "") -> nn.Module:
    """fallback="graph": everything pruned, as a GraphModule (dynamic batch where it checks out)."""
    expected = analysis.traced.output_shapes
    by_name = {n.name: new for n, new in changes.items()}
    gm = _patched_graph(analysis.traced.program, by_name, plan, work)
    try:
        got = output_shapes(gm, example_input)
    except Exception as exc:  # noqa: BLE001
        raise GraphPruneError(
            f"the compact model does not run ({failure.problem}) and the graph fallback failed too "
            f"({type(exc).__name__}: {exc}). Please report this with the model; meanwhile pass the "
            "offending module in ignored_layers."
        ) from exc
    if got != expected:
        raise GraphPruneError(f"compact model output shapes {got} differ from the original {expected}")
    batch_note = ""
    if not any(t.is_meta for t in gm.parameters()):
        dyn, why = dynamic_batch_graph(analysis, plan, changes, work, example_input, gm)
        if dyn is not None:
            gm, batch_note = dyn, "; it accepts any batch size"
        else:
            batch = _batch_of(example_input)
            batch_note = (f"; it only accepts the example's batch size ({batch}) and input shapes: {why}"
                          if batch is not None else "")
    why = f" ({why_not_freeze})" if why_not_freeze else ""
    warn_user(
        f"graphprune: the compact model of class {type(work).__name__} cannot run at the new sizes "
        f"({failure.problem}); returning an fx GraphModule with the same behaviour instead{why}"
        f"{batch_note}. To get your own class back, {FIX}."
    )
    plan.notes.append(f"returned an fx GraphModule{batch_note}: {failure.problem}")
    return gm


Replan = Callable[[list[str]], tuple[Any, Any]]


# the graph fallback's helpers that surgery.rewrite_fallback reuses (rewriting one submodule
# as a graph is the same carry-over of constants, on the submodule's own export)
restored_copy = _restored
merge_args = _merge
batch_of = _batch_of
grown_input = _grown
