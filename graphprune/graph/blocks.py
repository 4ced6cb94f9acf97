"""Removable blocks: residual branches ``y = x + f(x)`` found in the traced graph.

Depth pruning removes whole branches instead of channels. Which branches can go is read off the
exported graph, for any model, by general rules (no table of architectures):

1. A *residual add* is an ``aten.add`` of two tensors ``x`` and ``f`` of the output's shape and
   dtype where ``x`` is an ancestor of ``f``: the branch ``f`` is computed from ``x`` and added
   back. Removing it means ``y := x``, which keeps every shape by construction. A ResNet block
   with a downsampling shortcut adds ``conv(x) + f(x)``: neither side is the other's ancestor, so
   it is never offered; nor is an add that broadcasts (its output is not ``x``'s shape).
2. What a removal deletes is what becomes dead when ``y``'s users read ``x`` instead: the
   branch's ops and the parameters only they use. A branch that owns no parameter is not a block.
3. A *block* is the module that performs the add (the innermost module on the add's
   ``nn_module_stack``). Removing all residual adds performed by that module (a decoder layer's
   attention and MLP sub-layers together) must leave the module computing its input unchanged
   (only ops that return their input: ``to`` to the same dtype, ``clone``, ``alias``...) or, for a
   module in an ``nn.Sequential``, a chain of calls of its own parameter-free leaf modules (the
   ReLU after a ResNet bottleneck's add): then the module can be deleted from its
   ``nn.ModuleList`` / ``nn.Sequential`` (renumbering the rest) or replaced. Everything else is
   reported with the reason it is not offered.

The *output projections* of a branch are the parameters of the ops nearest to the add (walking
back through parameter-free ops): a block whose output projections are all zero adds nothing,
which is what the default weight-only score reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphprune.graph.inputs import normalize_inputs
from graphprune.graph.trace import Traced, no_cache

# ops that return their input's values unchanged (when dtype and shape are unchanged)
_IDENTITY_OPS = {
    "aten.alias.default", "aten.clone.default", "aten.detach.default", "aten.contiguous.default",
    "aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.device",
    "aten.lift_fresh_copy.default", "aten.dropout.default", "aten.view.default",
    "aten.reshape.default", "aten._assert_tensor_metadata.default",
}
_ADDS = {"aten.add.Tensor", "aten.add_.Tensor"}


@dataclass
class Block:
    """One removable (or found but refused) block: a module whose residual branches go together."""

    index: int
    module: str  # the module that performs the residual add(s)
    adds: list[str]  # residual add nodes performed by the module, in graph order
    skips: list[str]  # each add's skip input x (the add becomes x when its branch goes)
    params: list[str]  # parameters and buffers only the removed branches use
    modules: list[str]  # submodules whose every tensor goes with the block
    outputs: list[str]  # output projection parameters (nearest the adds)
    container: str | None = None  # the ModuleList / Sequential holding the module
    position: int | None = None  # the module's index in ``container``
    tail: list[str] = field(default_factory=list)  # leaf modules kept (run after the removed add)
    reason: str | None = None  # why it is not removable (None: removable)
    kind: str = "module"  # "module": the module goes; "branch": one branch's modules are replaced
    zero: dict | None = None  # branch: {"module", "at", "leaves"}: replaced by graphprune.depth.Zero
    skipped: list[str] = field(default_factory=list)  # branch: modules replaced by Skip

    @property
    def removable(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        if self.kind == "branch":
            how = f"{self.zero['module'] if self.zero else '?'} -> Zero, {len(self.skipped)} -> Skip"
        else:
            how = "deleted" if not self.tail else f"replaced by {', '.join(self.tail)}"
        return f"{self.module} ({len(self.adds)} branch(es), {len(self.params)} tensors; {how})"


@dataclass
class Residual:
    add: Node
    skip: Node  # x
    branch: Node  # f(x)


def _target(n: Node) -> str:
    return str(n.target)


def _shape_dtype(n: Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape), val.dtype
    return None


def ancestors(graph: torch.fx.Graph) -> dict[Node, int]:
    """Bit set (a Python int, bit = node position) of every node's ancestors."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    anc: dict[Node, int] = {}
    for n in graph.nodes:
        bits = 0
        for a in n.all_input_nodes:
            bits |= anc[a] | (1 << pos[a])
        anc[n] = bits
    return anc


def residuals(graph: torch.fx.Graph) -> list[Residual]:
    """Every add ``x + f(x)`` that keeps ``x``'s shape and dtype (rule 1 of the module docstring)."""
    anc = ancestors(graph)
    pos = {n: i for i, n in enumerate(graph.nodes)}
    out = []
    for n in graph.nodes:
        if n.op != "call_function" or _target(n) not in _ADDS or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        sd = _shape_dtype(n)
        if sd is None or _shape_dtype(a) != sd or _shape_dtype(b) != sd:
            continue
        if anc[b] >> pos[a] & 1:
            out.append(Residual(n, _source(a), b))
        elif anc[a] >> pos[b] & 1:
            out.append(Residual(n, _source(b), a))
    return out


def _source(x: Node) -> Node:
    """``x`` seen through ops that return their input unchanged (``to`` the same dtype...).

    torch.export may name a no-op cast inside a norm as the residual (the cast returns the same
    tensor); the value the skip carries is its input, so the norm dies with the branch.
    """
    while (_target(x) in _IDENTITY_OPS and x.args and isinstance(x.args[0], Node)
           and _shape_dtype(x.args[0]) == _shape_dtype(x)):
        x = x.args[0]
    return x


def resolve(node: Node, removed: dict[Node, Node]) -> Node:
    while node in removed:
        node = removed[node]
    return node


def live_nodes(graph: torch.fx.Graph, removed: dict[Node, Node]) -> set[Node]:
    """Nodes still needed once every ``add`` in ``removed`` is replaced by its skip input."""
    live: set[Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        n = resolve(n, removed)
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def residuals_by_module(found: list[Residual]) -> dict[str, list[Residual]]:
    """The residual adds by the module that performs them ("" for the model's own forward), in
    the order of their first add."""
    by_module: dict[str, list[Residual]] = {}
    for r in found:
        path = module_path(r.add)
        by_module.setdefault(path if path is not None else "", []).append(r)
    return by_module


def module_path(n: Node) -> str | None:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _paths(n: Node) -> set[str]:
    return {v[0] for v in (n.meta.get("nn_module_stack") or {}).values()}


def output_projections(res: Residual, traced: Traced) -> list[str]:
    """Parameters of the ops nearest to the add on the branch (walking back through parameter-free ops)."""
    params = traced.param_names
    kinds = _param_kinds(traced)
    found: list[str] = []
    seen: set[Node] = set()
    stack = [res.branch]
    while stack:
        n = stack.pop()
        if n in seen or n is res.skip:
            continue
        seen.add(n)
        direct = [a for a in n.all_input_nodes if a.op == "placeholder" and a.name in params]
        if direct:
            found.extend(params[a.name] for a in direct if kinds.get(a.name) == "PARAMETER")
            continue
        stack.extend(a for a in n.all_input_nodes if a.op != "placeholder")
    return sorted(set(found))


def _param_kinds(traced: Traced) -> dict[str, str]:
    return {s.arg.name: s.kind.name for s in traced.program.graph_signature.input_specs
            if hasattr(s.arg, "name")}


def _owned(traced: Traced, live: set[Node], before: set[Node]) -> list[str]:
    """Parameters/buffers whose placeholder dies with the removal."""
    return sorted({traced.param_names[n.name] for n in before - live
                   if n.op == "placeholder" and n.name in traced.param_names})


def _tensors_by_module(model: torch.nn.Module, traced: Traced) -> dict[str, list[str]]:
    """Module path -> the traced parameters/buffers under it (untraced buffers do not count), for
    every module ``named_modules`` lists. Built once: asking each module for its tensors again for
    every block was quadratic (0.4 s of a RepViT's verification)."""
    in_graph = set(traced.param_names.values())
    fqns = [n for n, _ in [*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)] if n in in_graph]
    under: dict[str, list[str]] = {}
    for name in fqns:
        parts = name.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]), []).append(name)
    return {path: under[path] for path, _ in model.named_modules() if path in under}


def _owned_modules(by_module: dict[str, list[str]], owned: Iterable[str]) -> list[str]:
    """Outermost submodules whose every traced tensor goes (``_tensors_by_module``)."""
    owned = set(owned)
    out = [path for path, names in by_module.items() if all(n in owned for n in names)]
    return [p for p in out if not any(p.startswith(q + ".") for q in out)]


def _identity_chain(out: Node, inside: set[Node], removed: dict[Node, Node]) -> Node | None:
    """Follow ``out`` back through identity ops inside the module; the outside node it reaches."""
    n = resolve(out, removed)
    while n in inside:
        if _target(n) not in _IDENTITY_OPS or not n.args or not isinstance(n.args[0], Node):
            return None
        src = n.args[0]
        if _shape_dtype(src) != _shape_dtype(n):
            return None
        n = resolve(src, removed)
    return n


def _tail_chain(out: Node, inside: set[Node], removed: dict[Node, Node], path: str,
                model: torch.nn.Module) -> tuple[Node, list[str]] | None:
    """Like ``_identity_chain`` but also through calls of parameter-free leaf children of ``path``."""
    n = resolve(out, removed)
    chain: list[str] = []
    while n in inside:
        if not n.args or not isinstance(n.args[0], Node):
            return None
        src = resolve(n.args[0], removed)
        if _target(n) in _IDENTITY_OPS and _shape_dtype(src) == _shape_dtype(n):
            n = src
            continue
        mp = module_path(n)
        if mp is None or mp == path or mp.rsplit(".", 1)[0] != path:
            return None
        leaf = model.get_submodule(mp)
        if list(leaf.children()) or list(leaf.parameters()) or list(leaf.buffers()):
            return None
        others = [a for a in n.all_input_nodes if a is not n.args[0]]
        if others:
            return None
        if not chain or chain[-1] != mp:
            chain.append(mp)
        n = src
    return n, chain[::-1]


def module_io(model: nn.Module, paths: set[str], example_input: Any) -> dict[str, tuple[Any, Any]]:
    """(first tensor input shape, output) of each module in ``paths`` on one run."""
    seen: dict[str, tuple[Any, Any]] = {}
    handles = []
    for path in paths:
        def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any, path: str = path) -> None:
            first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
            seen.setdefault(path, (None if first is None else tuple(first.shape), out))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    args, kwargs = normalize_inputs(example_input)
    try:
        with torch.no_grad(), no_cache(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _container(model: torch.nn.Module, path: str) -> tuple[str | None, int | None]:
    parent, _, last = path.rpartition(".")
    try:
        holder = model.get_submodule(parent)
    except AttributeError:
        return None, None
    if isinstance(holder, (torch.nn.ModuleList, torch.nn.Sequential)) and last.isdigit():
        return parent, int(last)
    return None, None


def find_blocks(traced: Traced, model: torch.nn.Module, example_input: Any = None) -> list[Block]:
    """Every module performing residual adds, removable or not (``Block.reason`` says why not).

    With ``example_input`` the model is run once to check that each block's first tensor input
    is its residual stream (what a deleted block hands on is its first input).
    """
    graph = traced.program.graph
    found = residuals(graph)
    before = live_nodes(graph, {})
    by_module = residuals_by_module(found)
    blocks: list[Block] = []
    tensors = _tensors_by_module(model, traced)
    for path, rs in by_module.items():
        removed = {r.add: r.skip for r in rs}
        live = live_nodes(graph, removed)
        owned = _owned(traced, live, before)
        outputs = sorted({p for r in rs for p in output_projections(r, traced)})
        block = Block(len(blocks), path, [r.add.name for r in rs], [r.skip.name for r in rs], owned,
                      _owned_modules(tensors, owned), outputs)
        block.reason = _why_not(block, graph, removed, live, model, set(traced.param_names))
        blocks.append(block)
    if example_input is not None:
        _check_first_inputs(blocks, model, example_input, {r.add.name: r for r in found})
    return blocks


def _check_first_inputs(blocks: list[Block], model: nn.Module, example_input: Any,
                        by_add: dict[str, Residual]) -> None:
    offered = [b for b in blocks if b.removable]
    io = module_io(model, {b.module for b in offered}, example_input) if offered else {}
    for b in offered:
        stream = _shape_dtype(by_add[b.adds[0]].skip)
        first = io.get(b.module, (None, None))[0]
        if stream is None or first != stream[0]:
            b.reason = (f"its first input (shape {first}) is not the residual stream (shape "
                        f"{None if stream is None else stream[0]}): a deleted block hands on its first input")


def _why_not(block: Block, graph: torch.fx.Graph, removed: dict[Node, Node], live: set[Node],
             model: torch.nn.Module, tensors: set[str]) -> str | None:
    path = block.module
    if not path:
        return "the residual add is in the model's own forward, which cannot be removed"
    if not block.params:
        return "its branches own no parameters"
    inside = {n for n in graph.nodes if path in _paths(n)}
    entries = {a for n in inside for a in n.all_input_nodes  # the model's inputs count, its weights not
               if a not in inside and not (a.op == "placeholder" and a.name in tensors)}
    exits = [n for n in inside if any(u not in inside for u in n.users)]
    if len(exits) != 1:
        return f"the module has {len(exits)} outputs, not 1"
    block.container, block.position = _container(model, path)
    reached = _identity_chain(exits[0], inside, removed)
    sources = {_source(e) for e in entries}  # an entry behind a no-op (eval dropout) is the same value
    if reached is not None and (reached in entries or reached in sources):
        return None
    if isinstance(model.get_submodule(block.container or path), torch.nn.Sequential) and block.container:
        tail = _tail_chain(exits[0], inside, removed, path, model)
        if tail is not None and (tail[0] in entries or tail[0] in sources):
            block.tail = tail[1]
            return None
    return "the module still computes something once its branches are removed (not an identity)"
