"""Channel labels: which structure (channel, feature, head) every tensor position belongs to.

Every prunable position of every parameter gets an integer *id* the first time a rule touches
that parameter dimension. Activations carry, per dimension, arrays of those ids (a ``Factor``)
so a rule can say "position j of this tensor is the same structure as position i of that one"
by recording an *edge* between ids. Connected components of the edges (computed once, with
scipy, after the whole graph is walked) are the *units* that must be removed together.

Why ids per position instead of per dimension: concatenation, split, channel shuffle, flatten
into a Linear and reshapes into attention heads all map channels to positions in ways that a
per-dimension graph cannot express, while an index array expresses each of them exactly.

Conventions
-----------
* A ``Factor`` covers one or more dimensions of a tensor; its ``ids`` array has one axis per
  covered dimension (in increasing dimension order). A multi-dimensional factor appears when a
  reshape splits a channel dimension (e.g. ``C -> (heads, head_dim)``).
* ``-1`` inside an ids array marks a position of fixed size (it came from a model input, a
  constant...). Coupling a real id with ``-1`` freezes the id.
* Dimensions not covered by any factor are *unlabelled*: batch, sequence, spatial dimensions.
  A labelled dimension coupled to an unlabelled one of the same size cannot change size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIXED = -1


@dataclass
class Factor:
    """Ids for the positions of one or more dimensions of a tensor.

    ``origin`` points at the joint-factor record this array was cut from (if any) and ``axes``
    maps each axis of ``ids`` to the origin's axis; that lets an op far downstream (a ``select``
    on the q/k/v axis, say) put a constraint on the array where the split happened.
    """

    dims: tuple[int, ...]
    ids: np.ndarray
    origin: int | None = None
    axes: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.axes:
            self.axes = (None,) * len(self.dims)

    def axis_of(self, dim: int) -> int:
        return self.dims.index(dim)

    def with_dims(self, dims: tuple[int, ...]) -> Factor:
        return Factor(dims, self.ids, self.origin, self.axes)


@dataclass
class TensorLabels:
    """Labels of one tensor: its shape and the factors covering some of its dimensions."""

    shape: tuple[int, ...]
    factors: list[Factor] = field(default_factory=list)

    def factor_at(self, dim: int) -> Factor | None:
        for f in self.factors:
            if dim in f.dims:
                return f
        return None

    @property
    def labelled(self) -> bool:
        return bool(self.factors)


@dataclass
class JointRecord:
    """A multi-dimensional ids array created by a reshape, and axes that must keep their size."""

    ids: np.ndarray
    where: str
    intact: set[int] = field(default_factory=set)


@dataclass
class Rescale:
    """Rows of a Linear to multiply by sqrt(E'/E) once ``ids`` lose channels along ``axis``.

    Recorded where SDPA's default scale (1/sqrt(E)) would change with the head size; the plan
    turns it into a factor once it knows how many channels stay (``graphprune.planning.plan``).
    """

    weight: str
    bias: str | None
    rows: np.ndarray
    ids: np.ndarray
    axis: int


class Coupler:
    """Accumulates ids, edges and freezes while rules walk the graph.

    Rules only ever call the methods of this class, which keeps each rule a small function of
    its inputs' labels.
    """

    def __init__(self) -> None:
        self.num_ids = 0
        self.space_sizes: list[int] = []
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.soft_frozen: list[tuple[np.ndarray, str]] = []
        self.param_ids: dict[tuple[str, int], np.ndarray] = {}
        self.joints: list[JointRecord] = []
        # attention="head_dim": a table over the inner axis of a joint layout (RoPE's cos/sin over
        # head_dim, broadcast across heads) goes with that position in every head (the heads
        # stay); otherwise such a table keeps its size
        self.inner_tables = False
        self.rescales: list[Rescale] = []  # q rows to rescale when SDPA's default scale changes

    # -- ids ---------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.num_ids, self.num_ids + n, dtype=np.int64)
        self.num_ids += n
        self.space_sizes.append(n)
        return ids

    def param(self, name: str, dim: int, size: int) -> np.ndarray:
        """Ids of dimension ``dim`` of parameter/buffer ``name`` (created on first use)."""
        key = (name, dim)
        if key not in self.param_ids:
            self.param_ids[key] = self.fresh(size)
        return self.param_ids[key]

    # -- constraints -------------------------------------------------------------------------
    def union(
        self,
        a: np.ndarray,
        b: np.ndarray,
        reason: str = "coupled with a fixed-size dimension (a model input, constant or unsupported layout)",
    ) -> None:
        """Couple ``a`` and ``b`` position by position (broadcasting); ids meeting FIXED freeze."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        a = a.ravel()
        b = b.ravel()
        both = (a >= 0) & (b >= 0)
        if both.any():
            self.edges_a.append(a[both])
            self.edges_b.append(b[both])
        one = (a >= 0) ^ (b >= 0)
        if one.any():
            self.freeze(np.where(a >= 0, a, b)[one], reason)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.frozen.append((ids, reason))

    def soft_freeze(self, ids: np.ndarray, reason: str) -> None:
        """Freeze unless the user opted in (``prune_hidden=True``): pruning here is not exact."""
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.soft_frozen.append((ids, reason))

    def freeze_labels(self, labels: TensorLabels | None, reason: str) -> None:
        if labels is not None:
            for f in labels.factors:
                self.freeze(f.ids, reason)

    def require_intact(self, factor: Factor, axis: int, reason: str) -> None:
        """Axis ``axis`` of ``factor`` must keep its size (e.g. it is indexed by position)."""
        origin_axis = factor.axes[axis] if factor.origin is not None else None
        if origin_axis is None:
            self.freeze(factor.ids, reason)
        else:
            self.joints[factor.origin].intact.add(origin_axis)

    def coarsen(self, factor: Factor, keep_axes: list[int]) -> Factor:
        """Merge positions along the axes not in ``keep_axes``; return the factor over the rest.

        Used where an op reduces or contracts over part of a joint factor: the result at a kept
        position depends on every position along the dropped axes, so they become one unit.
        """
        drop = [ax for ax in range(factor.ids.ndim) if ax not in keep_axes]
        if not drop:
            return factor
        rep = factor.ids
        for ax in sorted(drop, reverse=True):
            rep = np.take(rep, [0], axis=ax)
        self.union(factor.ids, rep)
        rep = np.squeeze(rep, axis=tuple(drop))
        keep = [ax for ax in range(factor.ids.ndim) if ax in keep_axes]
        return Factor(
            tuple(factor.dims[a] for a in keep), rep, factor.origin, tuple(factor.axes[a] for a in keep)
        )


def new_joint(coupler: Coupler, dims: tuple[int, ...], ids: np.ndarray, where: str) -> Factor:
    """Make a factor; a multi-dimensional one is recorded for the structural check."""
    if ids.ndim <= 1:
        return Factor(dims, ids)
    coupler.joints.append(JointRecord(ids, where))
    return Factor(dims, ids, len(coupler.joints) - 1, tuple(range(ids.ndim)))


def squeeze_constant_axes(dims: list[int], ids: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Drop axes along which every position carries the same id (a channel spread over pixels)."""
    ax = 0
    dims = list(dims)
    while ax < ids.ndim:
        first = np.take(ids, [0], axis=ax)
        if ids.shape[ax] == 1 or np.array_equal(np.broadcast_to(first, ids.shape), ids):
            ids = np.squeeze(first, axis=ax)
            del dims[ax]
        else:
            ax += 1
    return dims, ids
