"""Channel graph -> coupled groups.

Walk the exported graph once, applying each op's rule (``graphprune.graph.rules``); then connected
components of the recorded edges give the *units* (sets of positions removed together) and the
components of units sharing a parameter dimension give the *groups* (one pruning decision each).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import Node

from graphprune.errors import InputError
from graphprune.graph import rules
from graphprune.graph.arrays import distinct
from graphprune.graph.copies import keeps_global_rng, shared_eval_copy, storages, unshare
from graphprune.graph.labels import Coupler, TensorLabels
from graphprune.graph.lookup import submodule
from graphprune.graph.rules.registry import RuleContext, lookup, ops, where
from graphprune.graph.trace import Traced, check_model, node_source, trace, writes_inputs
from graphprune.surgery.constraints import module_constraints

rules.load_all()


@dataclass
class Member:
    """One parameter/buffer dimension touched by a group: which unit each position belongs to."""

    name: str
    dim: int
    unit_of: np.ndarray  # unit index per position, -1 where not a unit of this group

    def __repr__(self) -> str:
        return f"{self.name}[dim {self.dim}]"


@dataclass
class Group:
    """Units that form one pruning decision (e.g. all channels of one residual stream)."""

    index: int
    num_units: int
    members: list[Member]
    reason: str | None = None  # why (part of) it is frozen
    frozen_units: int = 0

    @property
    def prunable(self) -> bool:
        return self.num_units > 1

    def describe(self) -> str:
        names = sorted({m.name.rsplit(".", 1)[0] for m in self.members})
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
        return shown


@dataclass
class Analysis:
    """Everything later stages need: traced program, labels, unit of every id, groups."""

    traced: Traced
    model: nn.Module  # eval-mode deep copy; surgery works on it
    labels: dict[Node, Any]
    coupler: Coupler
    unit_class: np.ndarray  # class (component) of every id
    frozen_class: np.ndarray  # bool per class
    groups: list[Group]
    class_unit: dict[int, tuple[int, int]]  # class -> (group index, unit index)
    boundaries: list[str] = field(default_factory=list)
    frozen_reasons: dict[int, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # prune_hidden, attention (kept in plans)
    # storages of the user's tensors, which ``model`` shares (trace.shared_copy): a result handed
    # to the user must not keep any of them (trace.unshare)
    user_storages: set[int] = field(default_factory=set)
    # groups that must keep equal counts (planning.equal_counts; computed on first use)
    equal_counts: list[list[int]] | None = None


def to_networkx(analysis: Analysis):
    """The group graph for inspection: group nodes linked to the tensor dims they slice.

    Edges carry how many positions of the tensor dim belong to the group's units. Useful to see
    why two layers are coupled (``nx.shortest_path(g, "group:3", "tensor:fc.weight[1]")``).
    """
    import networkx as nx

    g = nx.Graph()
    for grp in analysis.groups:
        gid = f"group:{grp.index}"
        g.add_node(gid, units=grp.num_units, frozen_units=grp.frozen_units, reason=grp.reason)
        for m in grp.members:
            tid = f"tensor:{m.name}[{m.dim}]"
            g.add_node(tid, name=m.name, dim=m.dim)
            g.add_edge(gid, tid, positions=int((m.unit_of >= 0).sum()))
    return g


SMALL_GRAPH = 500_000  # ids; up to here numpy's union-find (0.1 s at 150k) beats importing scipy (0.4 s)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label of every id, numbered in the order of each component's smallest id."""
    if n > SMALL_GRAPH:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        return connected_components(graph, directed=False)[1]
    return union_find(n, np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Vectorised union-find: hook every edge's larger root under its smaller one, then point
    every id straight at its root, until no edge joins two roots. Labels as ``_components``."""
    root = np.arange(n)
    while True:
        ra, rb = root[a], root[b]
        joins = ra != rb
        if not joins.any():
            break
        lo, hi = np.minimum(ra[joins], rb[joins]), np.maximum(ra[joins], rb[joins])
        np.minimum.at(root, hi, lo)  # roots only ever move to smaller ids: this terminates
        while True:
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up
    return np.unique(root, return_inverse=True)[1].reshape(-1)


def _edges(coupler: Coupler) -> tuple[np.ndarray, np.ndarray]:
    if not coupler.edges_a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(coupler.edges_a), np.concatenate(coupler.edges_b)


def _enforce_joint_layouts(coupler: Coupler, cls: np.ndarray, frozen: np.ndarray) -> bool:
    """Every joint (multi-dim) ids array must lose whole slices along a single axis.

    If no axis already has that property, merge positions along the last free axis (for heads
    ``(heads, head_dim)`` that means pruning inside every head; for a channel shuffle
    ``(groups, C/groups)`` it keeps the number of groups). Returns True if anything changed.
    """
    changed = False
    for rec in coupler.joints:
        ids = rec.ids
        lab = np.where(ids >= 0, cls[np.maximum(ids, 0)], -1)
        lab = np.where((ids >= 0) & frozen[np.maximum(lab, 0)], -1, lab)
        free = [ax for ax in range(ids.ndim) if ax not in rec.intact and ids.shape[ax] > 1]
        ok = False
        for ax in free:
            slabs = np.moveaxis(lab, ax, 0).reshape(ids.shape[ax], -1)
            if (slabs == slabs[:, :1]).all():
                ok = True
                break
        if ok:
            continue
        live = lab[lab >= 0]
        if live.size == 0:
            continue
        if not free:
            coupler.freeze(ids, f"{rec.where}: channel layout cannot be reshaped after pruning")
        else:
            ax = free[-1]
            slabs = np.moveaxis(ids, ax, 0).reshape(ids.shape[ax], -1)
            coupler.union(slabs, slabs[:, :1])
        changed = True
    return changed


def _freeze_mask(n_cls: int, cls: np.ndarray, items: list[tuple[np.ndarray, str]], reasons: dict[int, str]):
    mask = np.zeros(n_cls, dtype=bool)
    for ids, why in items:
        c = cls[ids]
        for k in distinct(c[~mask[c]]):
            reasons.setdefault(int(k), why)
        mask[c] = True
    return mask


@keeps_global_rng
def _foreign_note(traced: Traced, node: Node, users: str, shape: list[int]) -> str:
    """Why a lifted constant keeps its size, told by where it came from."""
    holder = traced.holders.get(node.name)
    if holder:
        return (f"{users}: reads a tensor of shape {shape} kept in {holder} (a cache filled by an "
                "earlier forward, not a parameter or buffer), which keeps its size; clear that cache "
                "before pruning to prune these channels too")
    if any(u.target in ops("lift_fresh_copy.default") for u in node.users):
        return (f"{users}: uses a tensor of shape {shape} the forward builds from Python values "
                "(torch.tensor(...), indexing with a list), which keeps its size")
    return (f"{users}: reads a tensor of shape {shape} from outside the model (a hook's closure or "
            "a global, not a parameter or buffer), which keeps its size")


def analyze(
    model: nn.Module,
    example_input: Any,
    *,
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
) -> Analysis:
    """Trace ``model`` and find its coupled groups. Never modifies ``model``.

    ``attention`` says what an attention layer loses (see ``ATTENTION_MODES``).
    """
    check_model(model)
    check_attention(attention)
    names = _ignored_prefixes(model, ignored_layers)  # module objects belong to the user's model
    work = shared_eval_copy(model)  # shares the weights' memory: a 7B model is not held twice
    traced = trace(work, example_input)  # fake tensors only: nothing is written
    theirs = storages(model)
    if writes_inputs(traced.program):  # the forward writes into its arguments: never the user's
        unshare(work, theirs)
        theirs = set()
    analysis = analyze_traced(
        traced, work, prune_hidden=prune_hidden, attention=attention, ignored_names=names
    )
    analysis.user_storages = theirs
    return analysis


ATTENTION_MODES = {
    "heads": "whole heads; with grouped-query attention whole KV groups with their q heads "
    "(multi-query attention: q heads, the single KV head stays)",
    "q_heads": "q heads evenly within every KV group (the KV heads and the KV cache stay); "
    "plain multi-head attention: whole heads",
    "head_dim": "channels inside every head, the same positions in each head (the head count stays; "
    "under SDPA's default scale q's rows are rescaled to keep the logits, else whole heads)",
}


def check_attention(attention: Any) -> str:
    """Refuse an unknown ``attention`` mode with the list of valid ones."""
    if attention not in ATTENTION_MODES:
        modes = "; ".join(f"{k!r}: {v}" for k, v in ATTENTION_MODES.items())
        raise InputError(f"attention must be one of {modes}. Got {attention!r}.")
    return attention


def _ignored_prefixes(model: nn.Module, ignored: Any) -> list[str]:
    if ignored is None:
        return []
    if isinstance(ignored, (str, nn.Module)):
        ignored = [ignored]
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    out = []
    for item in ignored:
        if isinstance(item, str):
            if item not in modules and not any(n.startswith(item + ".") for n in modules):
                raise InputError(
                    f"ignored_layers entry {item!r} is not a module of the model; use dotted names "
                    "from model.named_modules() (e.g. 'layer1.0.conv1') or the module objects."
                )
            out.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in names:
                raise InputError(
                    f"ignored_layers entry {type(item).__name__} is not a submodule of the model given to "
                    "graphprune; pass modules of that model (or their dotted names)."
                )
            out.append(names[id(item)])
        else:
            raise InputError(
                f"ignored_layers entries must be modules or dotted names, got {type(item).__name__}"
            )
    return out


def analyze_traced(
    traced: Traced,
    work: nn.Module,
    *,
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    ignored_names: list[str] | None = None,
) -> Analysis:
    graph = traced.program.graph
    coupler = Coupler()
    labels: dict[Node, Any] = {}
    param_nodes = {
        n: traced.param_names[n.name]
        for n in graph.nodes
        if n.op == "placeholder" and n.name in traced.param_names
    }
    options = {"prune_hidden": bool(prune_hidden), "attention": check_attention(attention)}
    ctx = RuleContext(coupler, labels, param_nodes, options)
    coupler.inner_tables = options["attention"] == "head_dim"
    boundaries: list[str] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            shape = ctx.shape(node)
            labels[node] = TensorLabels(shape, []) if shape is not None and node not in param_nodes else None
            if node.name in traced.foreign and shape is not None and any(s > 1 for s in shape):
                users = ", ".join(sorted({where(u) for u in node.users}))
                boundaries.append(_foreign_note(traced, node, users, list(shape)))
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            for o in outs:
                if isinstance(o, Node) and o.name in traced.user_outputs:
                    coupler.freeze_labels(ctx.labels(o), "model output: its size is kept")
            continue
        if node.op == "call_function":
            _apply_rule(ctx, node, boundaries)
    module_constraints(work, coupler)  # widths tied in Python (nn.MultiheadAttention)
    prefixes = _ignored_prefixes(work, ignored_layers) + list(ignored_names or [])
    for (name, _dim), ids in coupler.param_ids.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            coupler.freeze(ids, f"ignored_layers: {name}")
    analysis = _group(traced, work, labels, coupler, boundaries, prune_hidden)
    analysis.options = options
    return analysis


_WRAPPERS = tuple(
    op
    for name in ("wrap_with_set_grad_enabled", "wrap_with_autocast")
    if (op := getattr(torch.ops.higher_order, name, None)) is not None
)


def _custom_op_hint(target: Any) -> str:
    """For an op a library registered (``torch.library.custom_op``): what it is and the way out.
    graphprune sees only its signature, never its inside, so no rule can be general for it."""
    namespace = getattr(target, "namespace", None)
    if namespace is None or namespace in ("aten", "prims", "_c10d_functional", "c10d_functional"):
        return ""
    return (f" (a custom op of the {namespace!r} library, opaque to graphprune; if the library offers "
            "a plain PyTorch path for this layer, select it, e.g. transformers' mixtures of experts: "
            "model.set_experts_implementation('batched_mm'))")


def _apply_rule(ctx: RuleContext, node: Node, boundaries: list[str]) -> None:
    if node.target in _WRAPPERS:
        ctx.labels_of[node] = _walk_wrapped(ctx, node, boundaries)
        return
    fn = lookup(node.target)
    if fn is None:
        _boundary(ctx, node, f"no rule for {node.target}{_custom_op_hint(node.target)}", boundaries)
        return
    try:
        ctx.labels_of[node] = fn(ctx, node)
    except Exception as exc:  # noqa: BLE001 - a rule bug must freeze, never crash or guess
        src = node_source(node)  # a rule bug is reported with the user's line that produced the op
        why = f"rule for {node.target} failed ({type(exc).__name__}: {exc})" + (f" at {src}" if src else "")
        _boundary(ctx, node, why, boundaries)


def _walk_wrapped(ctx: RuleContext, node: Node, boundaries: list[str]) -> Any:
    """A ``no_grad`` / ``autocast`` region (a higher-order op around a subgraph): walk it.

    torch.export keeps such regions as ``wrap_with_set_grad_enabled(enabled, submod, *args)``;
    Hugging Face computes its rotary tables in one. Treating the region as a boundary froze the
    tables, and with them every head_dim position they touch. The subgraph's placeholders take
    the labels of the operands (parameters stay parameters), its ops get the usual rules, and the
    output's labels are the region's.
    """
    at = next((i for i, a in enumerate(node.args) if isinstance(a, Node) and a.op == "get_attr"), None)
    owner = node.graph.owning_module
    sub = getattr(owner, node.args[at].target, None) if at is not None and owner is not None else None
    if sub is None or not hasattr(sub, "graph"):
        _boundary(ctx, node, "wrapped region without a readable subgraph", boundaries)
        return None
    operands = list(node.args[at + 1 :])
    result: Any = None
    for inner in sub.graph.nodes:
        if inner.op == "placeholder":
            src = operands.pop(0) if operands else None
            if isinstance(src, Node) and src in ctx.param_names:
                ctx.param_names[inner] = ctx.param_names[src]
            else:
                ctx.labels_of[inner] = ctx.labels(src)
        elif inner.op == "call_function":
            _apply_rule(ctx, inner, boundaries)
        elif inner.op == "output":
            outs = inner.args[0]
            if isinstance(outs, (tuple, list)):
                result = [ctx.labels(o) if isinstance(o, Node) else None for o in outs]
            else:
                result = ctx.labels(outs)
    return result


def _boundary(ctx: RuleContext, node: Node, why: str, boundaries: list[str]) -> None:
    frozen_any = False
    for arg in node.all_input_nodes:
        lab = ctx.labels(arg)
        if lab is not None and lab.factors:
            ctx.coupler.freeze_labels(lab, f"boundary: {why} at {where(node)}")
            frozen_any = True
    ctx.labels_of[node] = None
    if frozen_any:
        boundaries.append(f"{where(node)}: {why}")


def _class_groups(coupler: Coupler, cls: np.ndarray, n_cls: int) -> np.ndarray:
    """Group the units that touch exactly the same parameter dimensions ("spaces").

    All channels of one conv output (with its BN, the next conv's input slice...) touch the same
    spaces, and so do all channels of a residual stream; channels from two convs concatenated
    into one BatchNorm touch different spaces and stay separate groups, so ``ratio`` applies to
    each producer and none can be emptied. The set of spaces is compared through a sum of
    random 64-bit keys (vectorised; a collision is astronomically unlikely).
    """
    if not len(cls):
        return np.zeros(0, dtype=np.int64)
    space_of = np.repeat(np.arange(len(coupler.space_sizes)), coupler.space_sizes)
    pairs = distinct(cls.astype(np.int64) * len(coupler.space_sizes) + space_of)
    p_cls, p_space = np.divmod(pairs, len(coupler.space_sizes))
    keys = _mixed(len(coupler.space_sizes))
    sig = np.zeros(n_cls, dtype=np.uint64)
    np.add.at(sig, p_cls, keys[p_space])
    return np.unique(sig, return_inverse=True)[1].reshape(-1)


def _mixed(n: int) -> np.ndarray:
    """``n`` well-mixed 64-bit keys, always the same (splitmix64 of 1..n): the keys of
    ``_class_groups``, without importing ``numpy.random`` on a first call (10 ms)."""
    z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _renumbered(class_group: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Group numbers in the order each group first appears among the classes in ``order``."""
    raw = class_group[order]
    _, first_pos = np.unique(raw, return_index=True)
    remap = np.empty(int(class_group.max()) + 1, dtype=np.int64)
    remap[raw[np.sort(first_pos)]] = np.arange(len(first_pos))
    return remap[class_group]


def _number_units(cls: np.ndarray, n: int, n_cls: int, class_group: np.ndarray, frozen: np.ndarray,
                  reasons: dict[int, str]) -> tuple[list[Group], dict[int, tuple[int, int]], np.ndarray]:
    """Groups in the order of their first id, and each live class's (group, unit) number: units
    are numbered in the order of the classes' first ids. Vectorised: a loop over every class cost
    ~50 ms of a MobileNet's call. Returns (groups, class -> (group, unit), [group of each class,
    live classes' group, live classes' unit], the last two -1 for frozen classes)."""
    unit_idx = np.full(n_cls, -1, dtype=np.int64)
    group_idx = np.full(n_cls, -1, dtype=np.int64)
    if not n_cls:
        return [], {}, np.stack([class_group, group_idx, unit_idx])
    first_id = np.full(n_cls, n, dtype=np.int64)
    np.minimum.at(first_id, cls, np.arange(n))
    order = np.argsort(first_id, kind="stable")  # classes by first id
    renumbered = _renumbered(class_group, order)
    g_of = renumbered[order]
    perm = np.argsort(g_of, kind="stable")  # by group, then by first id
    classes, g_sorted = order[perm], g_of[perm]
    n_groups = int(g_sorted[-1]) + 1
    live = ~frozen[classes]
    live_cls, live_g = classes[live], g_sorted[live]
    units = np.arange(len(live_g)) - np.searchsorted(live_g, np.arange(n_groups))[live_g]
    unit_idx[live_cls] = units
    group_idx[live_cls] = live_g
    n_live = np.bincount(live_g, minlength=n_groups)
    n_all = np.bincount(g_sorted, minlength=n_groups)
    why: dict[int, Counter] = {}
    for c, g in zip(classes[~live].tolist(), g_sorted[~live].tolist(), strict=True):
        if c in reasons:
            why.setdefault(g, Counter())[reasons[c]] += 1
    groups = [
        Group(gi, int(n_live[gi]), [],
              "; ".join(w for w, _ in why[gi].most_common(3)) if gi in why else None,
              int(n_all[gi] - n_live[gi]))
        for gi in range(n_groups)
    ]
    class_unit = dict(zip(live_cls.tolist(), zip(live_g.tolist(), units.tolist(), strict=True), strict=True))
    return groups, class_unit, np.stack([renumbered, group_idx, unit_idx])


def _group(traced, work, labels, coupler: Coupler, boundaries, prune_hidden: bool) -> Analysis:
    n = coupler.num_ids
    for _ in range(20):
        a, b = _edges(coupler)
        cls = _components(n, a, b) if n else np.zeros(0, dtype=np.int64)
        n_cls = int(cls.max()) + 1 if n else 0
        reasons: dict[int, str] = {}
        frozen = _freeze_mask(
            n_cls, cls, coupler.frozen + ([] if prune_hidden else coupler.soft_frozen), reasons
        )
        if not _enforce_joint_layouts(coupler, cls, frozen):
            break
    class_group = _class_groups(coupler, cls, n_cls)
    groups, class_unit, (class_group, group_idx, unit_idx) = _number_units(
        cls, n, n_cls, class_group, frozen, reasons)
    for (name, dim), ids in coupler.param_ids.items():
        c = cls[ids]
        gs = class_group[c]
        if gs.size and gs.min() == gs.max():  # the usual case: one group (no np.unique per tensor)
            gi = int(gs[0])
            groups[gi].members.append(Member(name, dim, np.where(group_idx[c] == gi, unit_idx[c], -1)))
            continue
        for gi in distinct(gs):
            in_g = gs == gi
            unit_of = np.where(in_g & (group_idx[c] == gi), unit_idx[c], -1)
            groups[int(gi)].members.append(Member(name, dim, unit_of))
    return Analysis(traced, work, labels, coupler, cls, frozen, groups, class_unit, boundaries, reasons)


def param_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or tensor attribute ``name`` (dotted path) of ``model``."""
    mod_name, _, attr = name.rpartition(".")
    return getattr(submodule(model, mod_name), attr)
