"""Groups whose kept widths one integer attribute describes keep equal counts.

timm's EfficientViT-M attention splits the output of every head's qkv with the same
``[self.key_dim, self.key_dim, self.val_dim]``. The heads' value channels can be groups of their
own (the last head's, unlike the others, does not feed the next head's input), and every group
is cut on its own: when the counts differ (``round_to="auto"`` aligns one group and not the
other, a per-module ratio or global ranking takes more from one), no single ``val_dim`` describes
every head, the user's code cannot run at the new sizes, and the module is rewritten as a graph
(docs/rewrite.md) or kept whole. Giving such groups one count keeps the user's code running.

Which groups: an integer constant of a shape op (``view``/``reshape``/``expand``, ``split``,
``split_with_sizes``, ``unflatten``) that equals an integer attribute of the module that ran the
op, and sizes a dimension whose positions are exactly the units of one prunable group. Groups
found for the same (module, value) are tied. Positions that are frozen tie nothing (they keep
their size; a tie with them is left to the fallback). Two attributes that happen to hold the
same value tie their groups too: that costs freedom, never correctness.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.fx import Node

from graphprune.graph.analysis import Analysis
from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.registry import int_attributes, module_path, ops

SHAPE_ARG = set(ops("view.default", "reshape.default", "_unsafe_view.default", "expand.default"))
SPLIT = set(ops("split.Tensor", "unsafe_split.Tensor"))
SPLIT_SIZES = set(ops("split_with_sizes.default"))
UNFLATTEN = set(ops("unflatten.int"))


def _labels(analysis: Analysis, node: Node, index: int | None = None) -> TensorLabels | None:
    lab = analysis.labels.get(node)
    if isinstance(lab, list):
        lab = lab[index] if index is not None and index < len(lab) else None
    return lab if isinstance(lab, TensorLabels) else None


def _constants(analysis: Analysis, node: Node) -> Iterator[tuple[int, TensorLabels | None, int]]:
    """(constant, labels of the tensor it sizes, the dim it sizes) for each size constant of ``node``."""
    args = node.args
    if node.target in SHAPE_ARG and len(args) > 1 and isinstance(args[1], (list, tuple)):
        for i, v in enumerate(args[1]):
            yield v, _labels(analysis, node), i
    elif node.target in SPLIT_SIZES and isinstance(args[1], (list, tuple)):
        vals = node.meta.get("val")
        if isinstance(vals, (list, tuple)) and vals:
            dim = (args[2] if len(args) > 2 else 0) % len(vals[0].shape)
            for k, v in enumerate(args[1]):
                yield v, _labels(analysis, node, k), dim
    elif node.target in SPLIT and isinstance(args[1], int):
        vals = node.meta.get("val")
        if isinstance(vals, (list, tuple)) and vals:
            dim = (args[2] if len(args) > 2 else 0) % len(vals[0].shape)
            yield args[1], _labels(analysis, node, 0), dim
    elif node.target in UNFLATTEN and len(args) > 2:
        val = node.meta.get("val")
        if val is not None:
            dim = args[1] % (len(val.shape) - len(args[2]) + 1)
            for k, v in enumerate(args[2]):
                yield v, _labels(analysis, node), dim + k


def _group_of(analysis: Analysis, lab: TensorLabels | None, dim: int, size: int) -> int | None:
    """The prunable group whose units are exactly the positions of ``dim`` (one unit each), else None."""
    f = lab.factor_at(dim) if lab is not None else None
    if f is None or f.ids.ndim != 1 or len(f.ids) != size or (f.ids < 0).any():
        return None
    cls = analysis.unit_class[f.ids]
    if analysis.frozen_class[cls].any():
        return None
    units = [analysis.class_unit.get(int(c)) for c in cls]
    if any(u is None for u in units):
        return None
    groups = {g for g, _ in units}
    if len(groups) != 1:
        return None
    gi = groups.pop()
    if len({u for _, u in units}) != size or analysis.groups[gi].num_units != size:
        return None
    return gi


def equal_count_sets(analysis: Analysis) -> list[list[int]]:
    """Sets of group indices that must keep equal unit counts (computed once per analysis)."""
    cached = getattr(analysis, "equal_counts", None)
    if cached is not None:
        return cached
    tied: dict[tuple[str, int], set[int]] = {}
    attrs: dict[str, set[int]] = {}
    for node in analysis.traced.program.graph.nodes:
        if node.op != "call_function":
            continue
        path = module_path(node)
        for value, lab, dim in _constants(analysis, node):
            if type(value) is not int or value < 2:
                continue
            if path not in attrs:
                attrs[path] = {v for _, v in int_attributes(analysis.model, path)}
            if value not in attrs[path]:
                continue
            gi = _group_of(analysis, lab, dim, value)
            if gi is not None:
                tied.setdefault((path, value), set()).add(gi)
    sets = _merged([s for s in tied.values() if len(s) > 1])
    analysis.equal_counts = sets
    return sets


def _merged(sets: list[set[int]]) -> list[list[int]]:
    """Overlapping sets joined (a group tied through two attributes ties both sets)."""
    out: list[set[int]] = []
    for s in sets:
        s = set(s)
        for other in [o for o in out if o & s]:
            s |= other
            out.remove(other)
        out.append(s)
    return sorted(sorted(s) for s in out)


def equalize(keep: dict[int, int], sizes: dict[int, int], sets: list[list[int]],
             exempt: set[int]) -> tuple[dict[int, int], int]:
    """Kept counts with every tied set at one count: the largest kept in the set (never cutting
    more than any of its groups asked for). ``keep`` holds the groups being cut, ``sizes`` every
    prunable group's units (a tied group not being cut keeps them all); groups in ``exempt``
    (exact counts asked for) are neither changed nor counted. Returns (counts, sets changed)."""
    out = dict(keep)
    changed = 0
    for s in sets:
        members = [g for g in s if g in sizes and g not in exempt]
        if len(members) < 2 or len({sizes[g] for g in members}) != 1:
            continue
        kept = {g: out.get(g, sizes[g]) for g in members}
        common = max(kept.values())
        if any(k != common for k in kept.values()):
            changed += 1
            for g in members:
                out[g] = common
    return out, changed
