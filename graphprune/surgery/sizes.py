"""New tensor sizes after pruning, and the integer constants in the graph that must follow them.

A user's ``forward`` often feeds module attributes into reshapes
(``x.reshape(B, N, 3, self.num_heads, self.head_dim)``). The traced graph holds those integers
as constants; here we compute what each should become, and then find the attribute of the
module that ran the op holding the old value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from graphprune.graph.analysis import Analysis
from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.registry import int_attributes, module_path, ops
from graphprune.planning.plan import AttrUpdate

SHAPE_ARG = ops("view.default", "reshape.default", "_unsafe_view.default", "expand.default")
SPLIT = ops("split.Tensor", "unsafe_split.Tensor")
SPLIT_SIZES = ops("split_with_sizes.default")
UNFLATTEN = ops("unflatten.int")
NORM_SHAPE = ops("layer_norm.default", "native_layer_norm.default", "rms_norm.default")
SLICE = ops("slice.Tensor")


class Sizer:
    """New size of any labelled tensor dimension, given which classes are removed."""

    def __init__(self, analysis: Analysis, removed_class: np.ndarray) -> None:
        self.cls = analysis.unit_class
        self.removed = removed_class

    def keep_mask(self, ids: np.ndarray) -> np.ndarray:
        safe = np.maximum(ids, 0)
        return np.where(ids >= 0, ~self.removed[self.cls[safe]] if self.cls.size else True, True)

    def size(self, lab: TensorLabels | None, dim: int, old: int) -> int:
        if lab is None:
            return old
        f = lab.factor_at(dim)
        if f is None:
            return old
        keep = self.keep_mask(f.ids)
        ax = f.axis_of(dim)
        return int(np.moveaxis(keep, ax, 0).reshape(keep.shape[ax], -1).any(axis=1).sum())

    def prefix(self, lab: TensorLabels | None, dim: int, pos: int) -> int:
        """How many positions before ``pos`` along ``dim`` survive (for slice bounds)."""
        f = lab.factor_at(dim) if lab else None
        if f is None:
            return pos
        ax = f.axis_of(dim)  # joint layouts lose whole slices: a position is kept if any of it is
        keep = np.moveaxis(self.keep_mask(f.ids), ax, 0).reshape(f.ids.shape[ax], -1).any(axis=1)
        return int(keep[:pos].sum())


def _lab(analysis: Analysis, node: Any, index: int | None = None) -> TensorLabels | None:
    lab = analysis.labels.get(node) if isinstance(node, Node) else None
    if isinstance(lab, list):
        lab = lab[index] if index is not None and index < len(lab) else None
    return lab if isinstance(lab, TensorLabels) else None


def new_args(analysis: Analysis, sizer: Sizer, node: Node) -> tuple | None:
    """The node's args with shape constants updated, or None if nothing changes."""
    args = list(node.args)
    val = node.meta.get("val")
    changed = False
    if node.target in SHAPE_ARG and isinstance(args[1], (list, tuple)):
        lab = _lab(analysis, node)
        shape = list(args[1])
        for i, v in enumerate(shape):
            if isinstance(v, int) and v >= 0:
                nv = sizer.size(lab, i, v)
                if nv != v:
                    shape[i] = nv
                    changed = True
        args[1] = shape
    elif node.target in NORM_SHAPE and isinstance(args[1], (list, tuple)) and isinstance(args[0], Node):
        lab = _lab(analysis, args[0])  # normalized_shape: the input's trailing dims
        rank = len(args[0].meta["val"].shape)
        shape = [sizer.size(lab, rank - len(args[1]) + i, v) for i, v in enumerate(args[1])]
        changed = shape != list(args[1])
        args[1] = shape
    elif node.target in UNFLATTEN:
        lab = _lab(analysis, node)
        dim = args[1] % (len(val.shape) - len(args[2]) + 1)  # a negative dim counts in the input
        sizes = list(args[2])
        for k, v in enumerate(sizes):
            if isinstance(v, int) and v >= 0:
                nv = sizer.size(lab, dim + k, v)
                changed |= nv != v
                sizes[k] = nv
        args[2] = sizes
    elif node.target in SPLIT and isinstance(args[1], int):
        dim = (args[2] if len(args) > 2 else 0) % len(val[0].shape)
        if type(val[0].shape[dim]) is not int:  # a size known only at run time
            return None
        lab = _lab(analysis, node, 0)
        nv = sizer.size(lab, dim, int(val[0].shape[dim]))
        if nv != args[1]:
            args[1] = nv
            changed = True
    elif node.target in SPLIT_SIZES:
        dim = (args[2] if len(args) > 2 else 0) % len(val[0].shape)
        if not all(type(v.shape[dim]) is int for v in val):  # sizes known only at run time
            return None  # (tokens split per expert): nothing of ours to rewrite
        sizes = [sizer.size(_lab(analysis, node, k), dim, int(v.shape[dim])) for k, v in enumerate(val)]
        if sizes != list(args[1]):
            args[1] = sizes
            changed = True
    elif node.target in SLICE and len(args) > 2:
        src = args[0]
        lab = _lab(analysis, src)
        dim = args[1] % len(src.meta["val"].shape)
        for k in (2, 3):
            if k < len(args) and isinstance(args[k], int) and type(src.meta["val"].shape[dim]) is int:
                full = int(src.meta["val"].shape[dim])
                pos = min(args[k] if args[k] >= 0 else full + args[k], full)
                nv = sizer.prefix(lab, dim, pos)
                if nv != pos and pos != full:
                    args[k] = nv
                    changed = True
    return tuple(args) if changed else None


def graph_constant_changes(analysis: Analysis, sizer: Sizer) -> dict[Node, tuple]:
    changes = {}
    for node in analysis.traced.program.graph.nodes:
        if node.op == "call_function":
            new = new_args(analysis, sizer, node)
            if new is not None:
                changes[node] = new
    return changes


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for x in value for v in _ints(x)]
    return []


class UncertainUpdate(AttrUpdate):
    """An update whose old value also stays unchanged elsewhere in the same op.

    In LLaMA's ``expand(batch, kv_heads, n_rep, ...)`` with 2 kv heads and ``n_rep == 2``, the 2
    that changes is the kv head count, but an attribute holding 2 may be ``n_rep``. Such updates
    are applied only when the model cannot run without them (see ``attributes.choose_attr_updates``).
    """


def _size_list(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints if it is a non-empty flat list/tuple of ints, else None."""
    if isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
        return tuple(value)
    return None


SizeLists = dict[str, dict[tuple[int, ...], set[tuple[int, ...]]]]  # module -> old list -> new lists


def _sequence_updates(model, per_module: SizeLists) -> list[AttrUpdate]:
    """Tuple/list attributes passed whole as an op's size list (``torch.split(x, self.split_sizes)``).

    The graph holds the list the forward read, so an attribute equal to the old list is that list
    and takes the new one, with its type kept. Two different new lists for one old list (two
    splits of one module pruned differently) leave the choice to a trial run.
    """
    ups: list[AttrUpdate] = []
    for path, mapping in per_module.items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        for attr, val in vars(mod).items():
            old = _size_list(val)
            if attr.startswith("_") or old is None or old not in mapping:
                continue
            news = sorted(mapping[old])
            cls = AttrUpdate if len(news) == 1 else UncertainUpdate
            ups.extend(cls(path, attr, val, type(val)(new)) for new in news)
    return ups


def attribute_updates(
    analysis: Analysis, changes: dict[Node, tuple], model
) -> tuple[list[AttrUpdate], list[str]]:
    """Attributes of the module that ran each changed op, holding an old value: integers, and
    tuples/lists of integers passed whole as a size list."""
    per_module: dict[str, dict[int, set[int]]] = {}
    per_module_lists: SizeLists = {}
    kept: dict[str, set[int]] = {}  # values also found unchanged in a changed op of the module
    for node, args in changes.items():
        path = module_path(node)
        for old_arg, new_arg in zip(node.args[1:], args[1:], strict=False):
            old_list, new_list = _size_list(old_arg), _size_list(new_arg)
            if old_list is not None and new_list is not None and old_list != new_list:
                per_module_lists.setdefault(path, {}).setdefault(old_list, set()).add(new_list)
        for old, new in zip(_ints(node.args[1:]), _ints(args[1:]), strict=False):
            if old != new:
                per_module.setdefault(path, {}).setdefault(old, set()).add(new)
            else:
                kept.setdefault(path, set()).add(old)
    ups: list[AttrUpdate] = []
    notes: list[str] = []
    for path, mapping in per_module.items():
        for attr, val in int_attributes(model, path):
            if val not in mapping:
                continue
            news = mapping[val]
            if len(news) == 1:
                cls = UncertainUpdate if val in kept.get(path, ()) else AttrUpdate
                ups.append(cls(path, attr, val, next(iter(news))))
            else:  # split([9, 9]) -> [7, 8]: one of them, or neither; chosen by running the model
                ups.extend(UncertainUpdate(path, attr, val, new) for new in sorted(news))
    ups.extend(_sequence_updates(model, per_module_lists))
    return ups, notes
