"""Rewrite only the submodules whose own code cannot run at the new sizes.

Some forwards read a size where graphprune cannot change it: timm's attention ends in
``x.transpose(1, 2).reshape(B, N, C)`` with ``C`` taken from the *input*, and its cross-stage
partial stages split with a width kept in a plain attribute (``x.split(self.expand_chs // 2)``).
Slicing the weights is right; the Python is what breaks. Instead of keeping such a module whole
(``fallback.py``'s freeze), this module replaces *only that submodule* by a graph module of its
own:

1. the submodule of a copy at the original sizes (``fallback.restored_copy``) is exported alone
   with torch.export, at the inputs it receives on the example (batch dimension dynamic, so the
   result accepts any batch size);
2. the sizes the whole-model analysis found changing inside that submodule (``Sizer`` /
   ``graph_constant_changes``) are carried over onto the submodule's own graph, node by node
   (the two programs run the same ops in the same order; they are aligned like the graph
   fallback's dynamic re-export);
3. the graph is bound to the pruned submodule's own Parameter and buffer objects under the same
   names, and takes its place in the parent. The outer model keeps its class and its
   ``state_dict`` keys; the graph is plain ATen ops on dense tensors (no masks).

What was rewritten is recorded on the plan (``Plan.rewrites``: the module, the shapes it was
exported at and every changed constant, old and new), so ``graphprune.load`` redoes exactly the
same rewrite on a freshly built base model (``redo``). The engine keeps a rewrite only when the
compact model then runs, gives the same rows at another batch size and passes the verification
against the masked reference; otherwise it keeps the modules whole as before.

The rewritten submodule (``Rewritten``) holds two graphs, exported in eval and in train mode
(dropout, batch statistics and their running averages), and runs the one its mode asks for.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError, PlanMismatchError
from graphprune.graph.inputs import forward
from graphprune.graph.trace import no_cache, quiet_torch_logs

Spec = dict[str, Any]  # {"args": [item...], "kwargs": {name: item}, "batch": int}


class Declined(Exception):
    """This submodule cannot be rewritten exactly; the caller keeps it whole instead."""


@dataclass
class Outcome:
    """The rewrite records (for the plan) and one line per rewritten class (for the warning)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    classes: dict[str, list[str]] = field(default_factory=dict)  # class name -> paths


# ------------------------------------------------------------------------------------------
# inputs: captured on the example, stored as shapes, rebuilt as zeros
# ------------------------------------------------------------------------------------------


def scalar(v: Any) -> bool:
    """A plain value a plan can record as is (JSON keeps it exactly)."""
    return v is None or isinstance(v, (bool, int, float, str))


def plain(v: Any) -> bool:
    """A plain value, or a flat list or tuple of them (``feat_size=(H, W)``, ``shift_size=[3, 3]``)."""
    return scalar(v) or (isinstance(v, (list, tuple)) and all(scalar(x) for x in v))


def setting(v: Any) -> bool:
    """A plain attribute a module's code may branch on (nested tuples too, e.g. window sizes)."""
    return plain(v) or isinstance(v, tuple)


def _item_spec(v: Any, batch: int) -> dict[str, Any]:
    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.layout != torch.strided:
            raise Declined(f"an input of layout {v.layout} / dtype {v.dtype}")
        return {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                "batch": bool(v.dim() and v.shape[0] == batch)}
    if scalar(v):
        return {"value": v}
    if plain(v):  # a list or tuple of plain values: which one it was matters to the graph's input spec
        return {"value": list(v), "sequence": type(v).__name__}
    raise Declined(f"an input of type {type(v).__name__} (only tensors and plain values are recorded)")


def _item_value(item: dict[str, Any], device: torch.device) -> Any:
    if "value" in item:
        if item.get("sequence") == "tuple":
            return tuple(item["value"])
        return list(item["value"]) if "sequence" in item else item["value"]
    dtype = getattr(torch, str(item.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise PlanMismatchError(f"a rewrite input has unknown dtype {item.get('dtype')!r}")
    return torch.zeros(item["shape"], dtype=dtype, device=device)


def capture(src: nn.Module, paths: list[str], inputs: tuple[tuple, dict], batch: int) -> dict[str, Spec]:
    """The inputs each module of ``paths`` receives when ``src`` runs ``inputs`` (args, kwargs).

    A module called more than once (shared) has no single input to export at: it is left out.
    ``src``'s buffers are left as they were before the forward.
    """
    seen: dict[str, list[tuple[tuple, dict]]] = {p: [] for p in paths}
    # ``src`` stays in the state of the compact model (``settle`` needs to see which caches are
    # still empty there): the buffers are put back after the forward
    state = [(m, dict(m._buffers)) for m in src.modules()]
    handles = []
    for p in paths:
        mod = src.get_submodule(p)
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k, p=p: seen[p].append((a, dict(k))), with_kwargs=True))
    try:
        with torch.no_grad(), no_cache(src):
            forward(src, *inputs)
    finally:
        for h in handles:
            h.remove()
    for m, buffers in state:  # the forward may have filled caches in buffers: put them back
        m._buffers.clear()
        m._buffers.update(buffers)
    specs: dict[str, Spec] = {}
    for p, calls in seen.items():
        if len(calls) != 1:
            continue
        a, k = calls[0]
        try:
            specs[p] = {"args": [_item_spec(v, batch) for v in a],
                        "kwargs": {n: _item_spec(v, batch) for n, v in k.items()}, "batch": batch}
        except Declined:
            continue
    return specs


def _inputs(mod: nn.Module, spec: Spec) -> tuple[tuple, dict[str, Any]]:
    device = next((t.device for t in [*mod.parameters(), *mod.buffers()]), torch.device("cpu"))
    return (tuple(_item_value(i, device) for i in spec["args"]),
            {n: _item_value(i, device) for n, i in spec["kwargs"].items()})


def _run_once(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    was = mod.training
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod.eval()  # not chained: some classes' train() returns None (timm's EfficientViT)
            mod(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - it must run alone at the original sizes
        raise Declined(f"it does not run alone at the original sizes ({type(exc).__name__})") from exc
    finally:
        mod.train(was)


def settle(mod: nn.Module, spec: Spec) -> dict[str, torch.Tensor]:
    """Run ``mod`` once at ``spec`` so the caches its forward keeps in its own buffers are filled;
    returns the buffers it replaced (name -> the filled tensor).

    ConViT's attention starts with an empty ``rel_indices`` buffer and replaces it on its first
    forward. Exported with the cache empty, the graph would write a tensor of another shape into
    the buffer (which fails); exported with it filled, the graph reads the buffer, so every
    module running that graph must hold the filled one, including those the compact model's
    failing forward never reached. A cache is taken only when it depends on shapes alone: a copy
    with other weights, run on other inputs, must fill the same values; one computed from the
    weights or inputs is a state a graph cannot hold, and the module is kept whole.
    """
    args, kwargs = _inputs(mod, spec)
    probe = copy.deepcopy(mod)
    before = dict(mod.named_buffers())
    try:
        _run_once(mod, args, kwargs)
    except Declined:  # e.g. it checks its inputs' values, and zeros fail: the export decides
        return {}
    replaced = {n: b for n, b in mod.named_buffers() if before.get(n) is not b}
    if not replaced:
        return {}
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(0.5)
    ones = lambda v: torch.ones_like(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    _run_once(probe, tuple(ones(a) for a in args), {n: ones(v) for n, v in kwargs.items()})
    theirs = dict(probe.named_buffers())
    for n, b in replaced.items():
        other = theirs.get(n)
        if other is None or other.shape != b.shape or not torch.equal(other, b):
            raise Declined(f"its forward fills its buffer {n!r} from its weights or inputs (a cache a "
                           "graph cannot hold)")
    return {n: b.detach().clone() for n, b in replaced.items()}


def _export(mod: nn.Module, spec: Spec, training: bool) -> torch.fx.GraphModule:
    """``mod`` exported alone at ``spec`` (dim 0 of batch-sized inputs dynamic), unlifted."""
    args, kwargs = _inputs(mod, spec)
    dim = torch.export.Dim("batch")

    def dyn(i: dict[str, Any]) -> Any:  # a sequence's spec is one entry per item (all static)
        if "sequence" in i:
            return (tuple if i["sequence"] == "tuple" else list)([None] * len(i["value"]))
        return {0: dim} if i.get("batch") else None

    names = list(inspect.signature(mod.forward).parameters)
    if len(names) < len(args) or any(inspect.signature(mod.forward).parameters[n].kind
                                      == inspect.Parameter.VAR_POSITIONAL for n in names[: len(args)]):
        raise Declined("its forward takes *args")
    shapes = {**{names[k]: dyn(i) for k, i in enumerate(spec["args"])},
              **{n: dyn(i) for n, i in spec["kwargs"].items()}}
    was = mod.training
    mod.train(training)
    try:
        with warnings.catch_warnings(), no_cache(mod), quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(mod, args, kwargs, dynamic_shapes=shapes, strict=False)
            gm = program.module()
    except Exception as exc:  # noqa: BLE001 - any export failure means: keep it whole
        raise Declined(f"torch.export failed on it ({type(exc).__name__})") from exc
    finally:
        mod.train(was)
    for node in list(gm.graph.nodes):  # the input guards check the *original* widths: drop them
        if node.op == "call_module" and not node.users and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def sym_free(nodes: Any) -> list[torch.fx.Node]:
    """The graph's ATen calls other than size queries: what two exports of one forward share."""
    return [n for n in nodes if n.op == "call_function" and "sym" not in str(n.target)]


def _key(mod: nn.Module, spec: Spec) -> str:
    """Modules alike in class, plain attributes, tensor shapes and inputs export to one graph."""
    parts = [type(mod).__qualname__, repr(spec)]
    for name, m in mod.named_modules():
        # lists too: two Swin blocks differ only in ``shift_size=[0, 0]`` vs ``[3, 3]``, and the
        # shifted one runs more ops (roll, mask): one shared export would be the wrong graph
        settings = {k: v for k, v in vars(m).items()
                    if not k.startswith("_") and setting(v)}
        parts.append(f"{name}:{type(m).__qualname__}:{sorted(settings.items(), key=lambda kv: kv[0])!r}")
    # non-persistent buffers too: a cache filled in one instance and empty in another (``settle``)
    tensors = [*mod.named_parameters(remove_duplicate=False), *mod.named_buffers(remove_duplicate=False)]
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors]
    return "|".join(parts)


Bases = tuple[torch.fx.GraphModule, torch.fx.GraphModule, dict[str, torch.Tensor]]


class Exports:
    """One export per distinct (class, attributes, shapes, inputs): ViT's twelve blocks share one.

    Each entry is the eval-mode graph, the train-mode graph (dropout, batch statistics) and the
    caches the forward filled before them (``settle``)."""

    def __init__(self) -> None:
        self.graphs: dict[str, Bases | Declined] = {}

    def get(self, mod: nn.Module, spec: Spec) -> Bases:
        key = _key(mod, spec)  # before settling: an instance with its cache empty must settle too
        if key not in self.graphs:
            try:
                settled = settle(mod, spec)
                self.graphs[key] = (_export(mod, spec, training=False), _export(mod, spec, training=True),
                                    settled)
            except Declined as why:
                self.graphs[key] = why
        got = self.graphs[key]
        if isinstance(got, Declined):
            raise got
        return got


# ------------------------------------------------------------------------------------------
# the changed constants: found by aligning the whole program with the submodule's graph
# ------------------------------------------------------------------------------------------


def region(program_graph: torch.fx.Graph, path: str) -> list[torch.fx.Node]:
    """The whole program's nodes computed inside module ``path`` (from torch.export's module stack)."""
    out = []
    for n in program_graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if any(v[0] == path for v in stack.values()):
            out.append(n)
    return out


def _diffs(old: Any, new: Any, at: list[int], out: list[dict[str, Any]]) -> None:
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for k, (o, n) in enumerate(zip(old, new, strict=True)):
            _diffs(o, n, [*at, k], out)
        return
    if isinstance(old, torch.fx.Node) or isinstance(new, torch.fx.Node):
        return
    if old != new:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (old, new)):
            raise Declined(f"a changed constant that is not a size ({old!r} -> {new!r})")
        out.append({"at": at, "old": old, "new": new})


def changed_constants(base: torch.fx.GraphModule, nodes: list[torch.fx.Node], changes: dict,
                      merge: Callable[[Any, Any, Any], Any]) -> list[dict[str, Any]]:
    """The constants of ``base``'s graph to change, as plain records ``{node, at, old, new}``.

    ``nodes`` are the whole program's nodes of this module; ``changes`` the whole program's new
    arguments per node; ``merge(old, new, here)`` puts the changed positions into ``here``'s
    arguments (None where a changed size is symbolic here: then the module is kept whole).
    """
    mine = sym_free(nodes)
    theirs = sym_free(base.graph.nodes)
    matcher = difflib.SequenceMatcher(
        None, [str(n.target) for n in mine], [str(n.target) for n in theirs], autojunk=False
    )
    pairs = {mine[b.a + k]: theirs[b.b + k] for b in matcher.get_matching_blocks() for k in range(b.size)}
    records: list[dict[str, Any]] = []
    for node in nodes:
        if node not in changes:
            continue
        here = pairs.get(node)
        if here is None:
            raise Declined(f"no counterpart of {node.name} in its own export")
        merged = merge(node.args, changes[node], here.args)
        if merged is None:
            raise Declined(f"a changed size of {node.name} is symbolic in its own export")
        found: list[dict[str, Any]] = []
        _diffs(list(here.args), list(merged), [], found)
        records += [{"node": here.name, **d} for d in found]
    return records


def _set_at(args: Any, at: list[int], old: int, new: int) -> Any:
    if not at:
        if args != old or isinstance(args, torch.fx.Node):
            raise PlanMismatchError(f"the rewrite expects the constant {old}, the export holds {args!r}")
        return new
    if not isinstance(args, (list, tuple)) or not 0 <= at[0] < len(args):
        raise PlanMismatchError(f"the rewrite's position {at} does not exist in the export")
    items = list(args)
    items[at[0]] = _set_at(items[at[0]], at[1:], old, new)
    return type(args)(items) if isinstance(args, tuple) else items


# ------------------------------------------------------------------------------------------
# building and installing the graph module
# ------------------------------------------------------------------------------------------


def _ensure_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in [p for p in path.split(".") if p]:
        if part not in mod._modules:
            mod._modules[part] = nn.Module()
        mod = mod._modules[part]
    return mod


def _pairs(a: torch.fx.Graph, b: torch.fx.Graph) -> dict[str, torch.fx.Node]:
    """``a``'s ATen calls by name -> ``b``'s counterparts (same ops in the same order)."""
    mine, theirs = sym_free(a.nodes), sym_free(b.nodes)
    matcher = difflib.SequenceMatcher(
        None, [str(n.target) for n in mine], [str(n.target) for n in theirs], autojunk=False
    )
    return {mine[m.a + k].name: theirs[m.b + k] for m in matcher.get_matching_blocks() for k in range(m.size)}


def _with_records(base: torch.fx.GraphModule, records: list[dict[str, Any]],
                  names: dict[str, str] | None = None) -> torch.fx.GraphModule:
    """A copy of ``base`` with ``records`` applied (``names``: record node -> this graph's node)."""
    with warnings.catch_warnings():  # torch's own pytree deprecation noise while copying
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(base.graph)
    by_name = {n.name: n for n in graph.nodes}
    for r in records:
        name = r["node"] if names is None else names.get(r["node"], "")
        node = by_name.get(name)
        if node is None:
            raise PlanMismatchError(f"the rewrite changes node {r['node']!r}, which the export does not have")
        node.args = _set_at(tuple(node.args), list(r["at"]), r["old"], r["new"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.fx.GraphModule(base, graph)


class Rewritten(nn.Module):
    """A submodule rewritten as graphs: the user's parameter tree, run by exported ATen code.

    It holds the same Parameters, buffers and child modules (the user's own, sliced, never
    called: their forward hooks do not fire) under the same names as the module it replaces, and
    runs the eval-mode graph in eval and the train-mode graph in train (each exported from the
    user's forward, with the new sizes), with itself as the graph code's ``self``: ``.to()``,
    ``load_state_dict`` and optimisers see ordinary tensors. ``code`` shows the eval graph.
    """

    def set_graphs(self, graphs: tuple[torch.fx.GraphModule, ...]) -> None:
        """The (eval, train) graphs, built on this module (their attributes are its own tensors)."""
        self.__dict__["graphs"] = graphs  # not submodules: state_dict lists this module's tensors once
        self._in_spec, self._out_spec = graphs[0]._in_spec, graphs[0]._out_spec

    def set_inputs(self, spec: Spec) -> None:
        """The plain values (not tensors) the graphs were exported at.

        torch.export bakes them into the graph, and the input guards that would check them go
        with the width guards (``_export``): ``forward`` refuses another value itself rather
        than silently computing with the old one.
        """
        cpu = torch.device("cpu")
        self.__dict__["values"] = (
            {k: _item_value(i, cpu) for k, i in enumerate(spec["args"]) if "value" in i},
            {n: _item_value(i, cpu) for n, i in spec["kwargs"].items() if "value" in i},
        )

    @property
    def code(self) -> str:
        return self.__dict__["graphs"][0].code

    def _check_values(self, args: tuple, kwargs: dict) -> None:
        by_position, by_name = self.__dict__.get("values", ({}, {}))
        got = [(f"argument {k}", args[k], v) for k, v in by_position.items() if k < len(args)]
        got += [(f"argument {n!r}", kwargs[n], v) for n, v in by_name.items() if n in kwargs]
        for what, value, expected in got:
            if value != expected:
                raise InputError(
                    f"this module was rewritten as a graph (docs/rewrite.md) at {what}={expected!r}, which "
                    f"the graph holds as a constant; it cannot run at {value!r}. Prune with an example input "
                    "that calls it as your data does, or list the module in ignored_layers"
                )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_values(args, kwargs)
        graph = self.__dict__["graphs"][1 if self.training else 0]
        return type(graph).forward(self, *args, **kwargs)


def _constants(graph: torch.fx.GraphModule, owner: nn.Module, params: set[str]) -> None:
    """The graph's own constants (lifted tensors) onto ``owner`` as non-persistent buffers."""
    for node in graph.graph.nodes:
        if node.op != "get_attr" or node.target in params:
            continue
        value = _attr(graph, node.target)
        mod_path, _, name = str(node.target).rpartition(".")
        dst = _ensure_module(owner, mod_path)
        have = dst.__dict__.get("_buffers", {}).get(name)
        if have is not None and not (have.shape == value.shape and torch.equal(have, value)):
            raise Declined(f"its train and eval graphs hold different constants named {node.target}")
        if isinstance(value, torch.Tensor):
            dst.register_buffer(name, value, persistent=False)
        else:
            raise Declined(f"its graph reads a non-tensor attribute {node.target}")


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def instance(bases: Bases, pruned: nn.Module, records: list[dict[str, Any]]) -> Rewritten:
    """``bases`` with ``records`` applied, bound to ``pruned``'s own tensors (a cache its forward
    fills, ``settle``, bound filled).

    The train graph gets the same changes at its counterparts of the eval graph's nodes.
    Parameters, buffers and children are the same objects (tied weights and optimiser state
    follow; ``attn.qkv.out_features`` still reads), buffers keep their persistence, so
    ``state_dict`` lists the same keys in the same order.
    """
    names = {k: v.name for k, v in _pairs(bases[0].graph, bases[1].graph).items()}
    graphs = (_with_records(bases[0], records), _with_records(bases[1], records, names))
    if graphs[1]._in_spec != graphs[0]._in_spec or graphs[1]._out_spec != graphs[0]._out_spec:
        raise Declined("its train and eval exports take different inputs")
    new = Rewritten()
    for name, p in pruned._parameters.items():
        new._parameters[name] = p
    settled = bases[2]
    for name, b in pruned._buffers.items():
        b = settled[name].clone() if name in settled else b
        new.register_buffer(name, b, persistent=name not in pruned._non_persistent_buffers_set)
    for name, child in pruned._modules.items():  # the user's own (sliced) children: attributes stay
        new._modules[name] = child
    for name, value in settled.items():  # a child's cache: filled in the (compact model's) child
        owner_path, _, leaf = name.rpartition(".")
        if owner_path:
            new.get_submodule(owner_path)._buffers[leaf] = value.clone()
    for name, v in vars(pruned).items():  # plain settings (num_heads...) stay readable
        if not name.startswith("_") and name != "training" and name not in vars(new) and setting(v):
            setattr(new, name, copy.copy(v))
    tensors = {n for n, _ in pruned.named_parameters(remove_duplicate=False)}
    tensors |= {n for n, _ in pruned.named_buffers(remove_duplicate=False)}
    for g in graphs:
        _constants(g, new, tensors)
    if list(new.state_dict(keep_vars=True)) != list(pruned.state_dict(keep_vars=True)):
        raise Declined("its graph module would not hold the same state_dict keys")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # rebuilt on ``new``: the graphs then refer to its tensors, not to the export's zeros
        new.set_graphs(tuple(torch.fx.GraphModule(new, g.graph) for g in graphs))
    new.train(pruned.training)
    return new


def install(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (in place of the module there); returns the module replaced."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent._modules[name]
    parent._modules[name] = new
    return old


def rewrite(work: nn.Module, src: nn.Module, path: str, spec: Spec, exports: Exports,
            records_of: Callable[[torch.fx.GraphModule], list[dict[str, Any]]],
            ) -> tuple[dict[str, Any], nn.Module]:
    """Replace ``work``'s module ``path`` by its graph (changes from ``records_of``): the record
    for the plan and the module replaced."""
    bases = exports.get(src.get_submodule(path), spec)
    records = records_of(bases[0])
    gm = instance(bases, work.get_submodule(path), records)
    gm.set_inputs(spec)
    old = install(work, path, gm)
    return {"module": path, "inputs": spec, "changes": records}, old


def redo(small: nn.Module, src: nn.Module, rewrites: list[dict[str, Any]]) -> None:
    """``graphprune.load``: make the plan's rewrites again on ``small`` (``src``: at the old sizes)."""
    exports = Exports()
    for r in rewrites:
        try:
            rewrite(small, src, r["module"], r["inputs"], exports, lambda _base, r=r: r["changes"])
        except (Declined, AttributeError, KeyError) as exc:
            raise PlanMismatchError(
                f"the plan rewrites module {r.get('module')!r} as a graph, which cannot be redone on this "
                f"base model ({exc}); load it with the same architecture and torch version it was saved with"
            ) from exc


def replay_rewrites(small: nn.Module, plan: Any) -> None:
    """After ``slicing.replay`` (``load``, ``apply_plan``): redo the plan's rewrites, if any."""
    if plan.rewrites:
        from graphprune.surgery.fallback import restored_copy

        redo(small, restored_copy(small, plan), plan.rewrites)
