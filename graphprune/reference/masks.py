"""Which positions a plan removes, as keep-masks over the traced graph's values."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from graphprune.errors import VerificationError
from graphprune.graph.analysis import Analysis
from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.pointwise import REDUCE_EXACT, REDUCE_STAT
from graphprune.graph.rules.registry import ops
from graphprune.planning.plan import Plan


class Inexact(Exception):
    """The reference cannot be computed exactly for this graph; carries the reason."""


def removed_classes(analysis: Analysis, plan: Plan) -> np.ndarray:
    """Bool per class (coupled unit): removed by ``plan``, re-derived from ``plan.slices`` alone.

    A plan must remove whole units: if it keeps some positions of a unit and drops others, or
    keeps indices out of order, the compact model cannot be right, whatever the numbers say.
    """
    cls = analysis.unit_class
    n = len(analysis.frozen_class)
    removed = np.zeros(n, dtype=bool)
    kept = np.zeros(n, dtype=bool)
    known = analysis.coupler.param_ids
    sliced: dict[tuple[str, int], np.ndarray] = {}
    for name, dims in plan.slices.items():
        for dim, idx in dims.items():
            if (name, dim) not in known:
                raise VerificationError(
                    f"the plan slices {name} along dim {dim}, which no coupled group of this model "
                    "contains; the plan was not made for this model (or the analysis changed)."
                )
            idx_arr = np.asarray(idx, dtype=np.int64).reshape(-1)
            if idx_arr.size > 1 and not bool((idx_arr[1:] > idx_arr[:-1]).all()):
                raise VerificationError(
                    f"the plan's kept indices for {name} dim {dim} are not strictly increasing; "
                    "surgery would reorder channels. The plan is corrupt."
                )
            sliced[(name, dim)] = idx_arr
    for key, ids in known.items():
        idx_arr = sliced.get(key)
        if idx_arr is None:
            kept[cls[ids]] = True
            continue
        name, dim = key
        mask = np.zeros(len(ids), dtype=bool)
        if idx_arr.size and (idx_arr.min() < 0 or idx_arr.max() >= len(ids)):
            raise VerificationError(f"the plan's kept indices for {name} dim {dim} are out of range")
        mask[idx_arr] = True
        removed[cls[ids[~mask]]] = True
        kept[cls[ids[mask]]] = True
    partial = np.flatnonzero(removed & kept)
    if partial.size:
        raise VerificationError(
            "the plan removes only part of a coupled unit, so the pruned layers disagree about which "
            f"channels exist: {describe_classes(analysis, partial)}. The plan is corrupt or was made "
            "for a different model."
        )
    return removed


def groups_of_classes(analysis: Analysis, classes: np.ndarray) -> list[int]:
    return sorted({analysis.class_unit[int(c)][0] for c in classes if int(c) in analysis.class_unit})


def describe_classes(analysis: Analysis, classes: np.ndarray) -> str:
    groups = groups_of_classes(analysis, classes)
    if groups:
        return "; ".join(f"group {g} ({analysis.groups[g].describe()})" for g in groups[:5])
    cls = analysis.unit_class
    names = sorted(
        {name for (name, _), ids in analysis.coupler.param_ids.items() if np.isin(cls[ids], classes).any()}
    )
    return "tensors " + ", ".join(names[:8])


def _keep_array(
    analysis: Analysis, removed: np.ndarray, lab: TensorLabels | None, shape: tuple[int, ...]
) -> np.ndarray | None:
    """Bool array broadcastable to ``shape``: False at removed positions (None if nothing is)."""
    if lab is None or not lab.factors:
        return None
    cls = analysis.unit_class
    keep = None
    for f in lab.factors:
        ids = np.asarray(f.ids)
        k = np.where(ids >= 0, ~removed[cls[np.maximum(ids, 0)]], True)
        if k.all():
            continue
        order = np.argsort(f.dims)
        dims = [f.dims[o] for o in order]
        k = np.transpose(k, order) if k.ndim > 1 else k
        view = [1] * len(shape)
        for ax, d in enumerate(dims):
            if d >= len(shape) or k.shape[ax] != shape[d]:
                raise Inexact(
                    f"labels of shape {k.shape} on dims {dims} do not fit the tensor shape {shape}"
                )
            view[d] = k.shape[ax]
        k = k.reshape(view)
        keep = k if keep is None else keep & k
    return keep


def _val_shape(val: Any) -> tuple[int, ...] | None:
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


def build_masks(analysis: Analysis, removed: np.ndarray, only: set[Node] | None = None) -> dict[Node, Any]:
    """Keep-masks (numpy bool, broadcastable) of every graph value that has removed positions.

    Activations use the labels the rules gave them; parameters and buffers use their own
    dimension ids (what surgery slices). Multi-output ops get a list (one entry per output).

    Equal masks are one array: a channel mask recurs along a chain (conv, its bias, the norm's
    four tensors, the activations between them), and the reference makes its torch form and
    its row/column factorisation once per array (interpreter.py), not once per node.
    """
    masks: dict[Node, Any] = {}
    canon: dict[tuple[tuple[int, ...], bytes], np.ndarray] = {}

    def shared(keep: np.ndarray | None) -> np.ndarray | None:
        if keep is None:
            return None
        return canon.setdefault((keep.shape, np.packbits(keep).tobytes()), keep)

    graph = analysis.traced.program.graph
    names = analysis.traced.param_names
    param_dims: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, dim), ids in analysis.coupler.param_ids.items():
        param_dims.setdefault(name, []).append((dim, ids))
    cls = analysis.unit_class
    for node in graph.nodes:
        if only is not None and node not in only:
            continue
        val = node.meta.get("val")
        if node.op == "placeholder":
            name = names.get(node.name)
            shape = _val_shape(val)
            if name is None or shape is None or name not in param_dims:
                continue
            keep = None
            for dim, ids in param_dims[name]:
                k = ~removed[cls[ids]]
                if k.all():
                    continue
                view = [1] * len(shape)
                view[dim] = len(ids)
                k = k.reshape(view)
                keep = k if keep is None else keep & k
            if keep is not None:
                masks[node] = shared(keep)
            continue
        if node.op != "call_function":
            continue
        lab = analysis.labels.get(node)
        if isinstance(lab, list):
            vals = val if isinstance(val, (tuple, list)) else [None] * len(lab)
            entry = [
                shared(_keep_array(analysis, removed, lb, _val_shape(v) or lb.shape))
                if isinstance(lb, TensorLabels)
                else None
                for lb, v in zip(lab, vals)
            ]
            if any(e is not None for e in entry):
                masks[node] = entry
        elif isinstance(lab, TensorLabels):
            shape = _val_shape(val) or lab.shape
            keep = shared(_keep_array(analysis, removed, lab, shape))
            if keep is not None:
                masks[node] = keep
    return masks


def reference_masks(analysis: Analysis, removed: np.ndarray) -> tuple[dict[Node, Any], dict[Node, Any]]:
    """All keep-masks, plus for inputs of statistics the masks of positions *not* soft-frozen.

    A statistic may be computed over kept positions only where the analysis allowed pruning
    through it (``prune_hidden``); anywhere else a removed position inside a reduction is a bug
    the reference must expose, not paper over.
    """
    masks = build_masks(analysis, removed)
    cls = analysis.unit_class
    soft = np.zeros(len(removed), dtype=bool)
    for ids, _ in analysis.coupler.soft_frozen:
        soft[cls[ids]] = True
    stat_inputs = {
        n.args[0]
        for n in analysis.traced.program.graph.nodes
        if n.op == "call_function"
        and (n.target in NORM_OPS or n.target in REDUCE_OPS)
        and n.args
        and isinstance(n.args[0], Node)
    }
    hard = build_masks(analysis, removed & ~soft, only=stat_inputs)
    return masks, hard


NORM_OPS = {
    op: kind
    for kind, names in (
        ("layer_norm", ("layer_norm.default", "native_layer_norm.default")),
        ("rms_norm", ("rms_norm.default",)),
    )
    for op in ops(*names)
}


REDUCE_OPS = set(REDUCE_EXACT) | set(REDUCE_STAT)
