"""Rules for ops that move positions around: reshape, permute, cat, split, slice, pool, pad..."""

from __future__ import annotations

import operator

import numpy as np
from torch.fx import Node

from graphprune.graph.labels import FIXED, Factor, TensorLabels, new_joint, squeeze_constant_axes
from graphprune.graph.rules.registry import RuleContext, ops, rule, where


def reshape_blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input and output dims with equal products: (B,N,768)->(B,N,12,64) gives
    [([0],[0]), ([1],[1]), ([2],[2,3])]. Size-1 dims get blocks of their own."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            raise ValueError(f"cannot pair reshape {src} -> {dst}")
        ins, outs = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                ins.append(i)
                i += 1
            else:
                pj *= dst[j]
                outs.append(j)
                j += 1
        blocks.append((ins, outs))
    return blocks


def reshape_labels(ctx: RuleContext, lab: TensorLabels | None, src, dst, why: str) -> TensorLabels:
    """Carry labels through any reshape; splitting a channel dim creates a joint factor."""
    dst = tuple(dst)
    if lab is None or not lab.factors:
        return TensorLabels(dst, [])
    blocks = reshape_blocks(tuple(src), dst)
    block_of = {}
    for bi, (ins, _) in enumerate(blocks):
        for d in ins:
            block_of[d] = bi
    # super-blocks: blocks linked by a factor spanning them
    parent = list(range(len(blocks)))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for f in lab.factors:
        bs = [block_of[d] for d in f.dims]
        for b in bs[1:]:
            parent[find(b)] = find(bs[0])
    members: dict[int, list[Factor]] = {}
    for f in lab.factors:
        members.setdefault(find(block_of[f.dims[0]]), []).append(f)
    out: list[Factor] = []
    for root, fs in members.items():
        bset = [bi for bi in range(len(blocks)) if find(bi) == root]
        in_dims = sorted(d for bi in bset for d in blocks[bi][0])
        out_dims = sorted(d for bi in bset for d in blocks[bi][1])
        if all(len(blocks[bi][0]) == 1 and len(blocks[bi][1]) == 1 for bi in bset):
            mapping = {blocks[bi][0][0]: blocks[bi][1][0] for bi in bset}
            for f in fs:
                out.append(f.with_dims(tuple(mapping[d] for d in f.dims)))
            continue
        if len(fs) > 1:
            for f in fs:
                ctx.coupler.freeze(f.ids, f"{why}: merges dims carrying different channels")
            continue
        f = fs[0]
        shape = [src[d] for d in in_dims]
        arr = f.ids
        # place the factor's axes among the block dims and broadcast over the others
        expand = [in_dims.index(d) for d in f.dims]
        full = np.empty(shape, dtype=np.int64)
        view_shape = [1] * len(shape)
        for ax, pos in enumerate(expand):
            view_shape[pos] = arr.shape[ax]
        full[...] = arr.reshape(view_shape)
        new = full.reshape([dst[d] for d in out_dims])
        dims, new = squeeze_constant_axes(out_dims, new)
        if not dims:
            ctx.coupler.freeze(f.ids, f"{why}: channels merged into an unlabelled dim")
            continue
        out.append(new_joint(ctx.coupler, tuple(dims), new, why))
    return TensorLabels(dst, out)


RESHAPES = ops(
    "view.default",
    "reshape.default",
    "_unsafe_view.default",
    "flatten.using_ints",
    "unflatten.int",
    "squeeze.dim",
    "squeeze.dims",
    "squeeze.default",
    "unsqueeze.default",
    "view_as.default",
    "reshape_as.default",
    "_reshape_alias.default",
)


@rule(*RESHAPES)
def reshape(ctx: RuleContext, node: Node):
    src, dst = ctx.shape(node.args[0]), ctx.shape(node)
    if src is None or dst is None:
        return None
    return reshape_labels(ctx, ctx.labels(node.args[0]), src, dst, where(node))


def _permute(lab: TensorLabels, perm: list[int], out_shape) -> TensorLabels:
    inv = {old: new for new, old in enumerate(perm)}
    factors = []
    for f in lab.factors:
        dims = [inv[d] for d in f.dims]
        order = np.argsort(dims)
        ids = np.transpose(f.ids, order) if f.ids.ndim > 1 else f.ids
        factors.append(Factor(tuple(dims[o] for o in order), ids, f.origin, tuple(f.axes[o] for o in order)))
    return TensorLabels(tuple(out_shape), factors)


@rule(
    *ops(
        "permute.default",
        "transpose.int",
        "t.default",
        "movedim.int",
        "swapaxes.default",
        "adjoint.default",
        "numpy_T.default",
    )
)
def permute(ctx: RuleContext, node: Node):
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    r = len(shape)
    if node.target in ops("permute.default"):
        perm = [d % r for d in node.args[1]]
    elif node.target in ops("movedim.int"):
        s, d = node.args[1] % r, node.args[2] % r
        perm = [i for i in range(r) if i != s]
        perm.insert(d, s)
    elif node.target in ops("t.default", "numpy_T.default"):
        perm = list(reversed(range(r)))
    else:
        a = node.args[1] % r if len(node.args) > 1 else r - 2
        b = node.args[2] % r if len(node.args) > 2 else r - 1
        perm = list(range(r))
        perm[a], perm[b] = perm[b], perm[a]
    return _permute(lab, perm, oshape)


@rule(*ops("expand.default", "expand_as.default"))
def expand(ctx: RuleContext, node: Node):
    """New leading dims and size-1 dims grown by expand are unlabelled; the rest keep labels."""
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    lead = len(oshape) - len(shape)
    factors = []
    for f in lab.factors:
        if any(shape[d] == 1 and oshape[d + lead] > 1 for d in f.dims):
            ctx.coupler.freeze(f.ids, f"{where(node)}: a labelled size-1 dim is expanded")
            continue
        factors.append(f.with_dims(tuple(d + lead for d in f.dims)))
    return TensorLabels(oshape, factors)


@rule(*ops("repeat.default"))
def repeat(ctx: RuleContext, node: Node):
    """Tiling a labelled dim repeats its ids (each copy is the same structure)."""
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    reps = list(node.args[1])
    lead = len(reps) - len(shape)
    factors = []
    for f in lab.factors:
        tiles = [reps[d + lead] for d in f.dims]
        dims = tuple(d + lead for d in f.dims)
        if any(t > 1 for t in tiles):
            factors.append(new_joint(ctx.coupler, dims, np.tile(f.ids, tiles), where(node)))
        else:
            factors.append(f.with_dims(dims))
    return TensorLabels(oshape, factors)


@rule(*ops("repeat_interleave.self_int"))
def repeat_interleave(ctx: RuleContext, node: Node):
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    reps = int(node.args[1])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:  # flattens, then repeats every element
        if reps == 1:
            return reshape_labels(ctx, lab, shape, (int(np.prod(shape)),), where(node))
        ctx.coupler.freeze_labels(lab, where(node))
        return TensorLabels(oshape, [])
    dim %= len(shape)
    factors = []
    for f in lab.factors:
        if dim in f.dims:
            ids = np.repeat(f.ids, reps, axis=f.axis_of(dim))
            factors.append(new_joint(ctx.coupler, f.dims, ids, where(node)))  # plain Factor if 1-D
        else:
            factors.append(f)
    return TensorLabels(oshape, factors)


@rule(*ops("cat.default", "concat.default", "concatenate.default"))
def cat(ctx: RuleContext, node: Node):
    """Concatenation lays the inputs' ids side by side; other dims are shared (coupled)."""
    tensors = [t for t in node.args[0] if ctx.shape(t) is not None]
    oshape = ctx.shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim %= len(oshape)
    why = where(node)
    labs = [ctx.labels(t) for t in tensors]
    cat_factors = [lab.factor_at(dim) if lab else None for lab in labs]
    dimsets = {f.dims for f in cat_factors if f is not None}
    out: list[Factor] = []
    if dimsets:
        fdims = next(iter(dimsets)) if len(dimsets) == 1 else (dim,)
        pieces = []
        for t, f in zip(tensors, cat_factors, strict=True):
            shape = ctx.shape(t)
            if f is not None and f.dims != fdims:
                f = ctx.coupler.coarsen(f, [f.axis_of(dim)])
            if f is None:
                pieces.append(np.full([shape[d] for d in fdims], FIXED, dtype=np.int64))
            else:
                pieces.append(f.ids)
        ids = np.concatenate(pieces, axis=fdims.index(dim))
        out.append(new_joint(ctx.coupler, fdims, ids, why))
    # dims other than the concatenation dim must agree between inputs
    others: dict[tuple[int, ...], Factor] = {}
    for lab in labs:
        if lab is None:
            continue
        for f in lab.factors:
            if dim in f.dims:
                continue
            if f.dims in others:
                ctx.coupler.union(others[f.dims].ids, f.ids)
            else:
                others[f.dims] = f
    out.extend(others.values())
    return TensorLabels(oshape, out)


@rule(*ops("stack.default"))
def stack(ctx: RuleContext, node: Node):
    """Stacking adds an unlabelled dim; the stacked tensors' dims are coupled."""
    tensors = [t for t in node.args[0] if ctx.shape(t) is not None]
    oshape = ctx.shape(node)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(oshape)
    merged: dict[tuple[int, ...], Factor] = {}
    for t in tensors:
        lab = ctx.labels(t)
        if lab is None:
            continue
        for f in lab.factors:
            dims = tuple(d + (1 if d >= dim else 0) for d in f.dims)
            if dims in merged:
                ctx.coupler.union(merged[dims].ids, f.ids)
            else:
                merged[dims] = f.with_dims(dims)
    return TensorLabels(oshape, list(merged.values()))


def _split_parts(ctx: RuleContext, node: Node, sizes: list[int], dim: int, equal: bool):
    lab = ctx.labels(node.args[0])
    vals = node.meta.get("val")
    out_shapes = [tuple(v.shape) for v in vals]
    if lab is None:
        return [TensorLabels(s, []) for s in out_shapes]
    f = lab.factor_at(dim)
    others = [g for g in lab.factors if g is not f]
    if f is None:
        return [TensorLabels(s, list(others)) for s in out_shapes]
    ax = f.axis_of(dim)
    why = where(node)
    if len(sizes) > 1 and equal and len(set(sizes)) == 1:
        # equal chunks stay equal only if every chunk loses the same positions
        parts = np.split(f.ids, len(sizes), axis=ax)
        for p in parts[1:]:
            ctx.coupler.union(parts[0], p)
    elif len(sizes) > 1 and equal:
        ctx.coupler.require_intact(f, ax, f"{why}: uneven chunks")
    bounds = np.cumsum([0] + sizes)
    res = []
    for k, s in enumerate(out_shapes):
        idx = [slice(None)] * f.ids.ndim
        idx[ax] = slice(int(bounds[k]), int(bounds[k + 1]))
        res.append(TensorLabels(s, others + [Factor(f.dims, f.ids[tuple(idx)], f.origin, f.axes)]))
    return res


@rule(
    *ops(
        "split.Tensor",
        "chunk.default",
        "split_with_sizes.default",
        "tensor_split.sections",
        "unsafe_split.Tensor",
    )
)
def split(ctx: RuleContext, node: Node):
    x = node.args[0]
    shape = ctx.shape(x)
    vals = node.meta.get("val")
    dim_pos = 2
    dim = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
    dim %= len(shape)
    sizes = [int(v.shape[dim]) for v in vals]
    equal = node.target not in ops("split_with_sizes.default")
    return _split_parts(ctx, node, sizes, dim, equal)


@rule(*ops("unbind.int"))
def unbind(ctx: RuleContext, node: Node):
    x = node.args[0]
    lab, shape = ctx.labels(x), ctx.shape(x)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    vals = node.meta.get("val")
    return [_select_labels(ctx, lab, dim, k, tuple(v.shape), where(node)) for k, v in enumerate(vals)]


def _select_labels(ctx: RuleContext, lab: TensorLabels | None, dim: int, index: int, oshape, why: str):
    if lab is None:
        return TensorLabels(oshape, [])
    factors = []
    for f in lab.factors:
        if dim in f.dims:
            ax = f.axis_of(dim)
            ctx.coupler.require_intact(f, ax, f"{why}: indexes a channel dim by position")
            if f.ids.ndim == 1:
                continue
            ids = np.take(f.ids, index, axis=ax)
            dims = tuple(d if d < dim else d - 1 for d in f.dims if d != dim)
            axes = tuple(a for i, a in enumerate(f.axes) if i != ax)
            factors.append(Factor(dims, ids, f.origin, axes))
        else:
            factors.append(f.with_dims(tuple(d if d < dim else d - 1 for d in f.dims)))
    return TensorLabels(oshape, factors)


@rule(*ops("select.int"))
def select(ctx: RuleContext, node: Node):
    x = node.args[0]
    shape = ctx.shape(x)
    dim = node.args[1] % len(shape)
    index = int(node.args[2]) % shape[dim]
    return _select_labels(ctx, ctx.labels(x), dim, index, ctx.shape(node), where(node))


@rule(*ops("slice.Tensor", "narrow.default"))
def slice_(ctx: RuleContext, node: Node):
    """A slice of a channel dim keeps that range of ids; surgery re-computes its bounds."""
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    if node.target in ops("narrow.default"):
        start, end, step = int(node.args[2]), int(node.args[2]) + int(node.args[3]), 1
    else:
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        start, end, step = slice(start, end, step).indices(shape[dim])
    f = lab.factor_at(dim)
    if f is None or (start == 0 and end >= shape[dim] and step == 1):
        return TensorLabels(oshape, list(lab.factors))
    factors = [g for g in lab.factors if g is not f]
    ax = f.axis_of(dim)
    n = shape[dim]
    if step != 1 and isinstance(start, int) and start < step and end >= n and n % step == 0:
        # an interleaved layout (gate/up pairs: ``x[..., ::2]``, ``x[..., 1::2]``): the positions
        # of each block of ``step`` go together, so after pruning the same offsets pick the same
        # kept parts, and the slice needs no new bounds
        blocks = np.moveaxis(f.ids, ax, 0)
        blocks = blocks.reshape(n // step, step, *blocks.shape[1:])
        ctx.coupler.union(blocks, blocks[:, :1])
    elif step != 1 or not isinstance(start, int):
        ctx.coupler.require_intact(f, ax, f"{where(node)}: strided slice of a channel dim")
    idx = [slice(None)] * f.ids.ndim
    idx[ax] = slice(start, end, step)
    factors.append(Factor(f.dims, f.ids[tuple(idx)], f.origin, f.axes))
    return TensorLabels(oshape, factors)


POOL_LIKE = ops(
    "max_pool1d.default",
    "max_pool2d.default",
    "max_pool3d.default",
    "avg_pool1d.default",
    "avg_pool2d.default",
    "avg_pool3d.default",
    "adaptive_avg_pool1d.default",
    "adaptive_avg_pool2d.default",
    "adaptive_avg_pool3d.default",
    "adaptive_max_pool1d.default",
    "adaptive_max_pool2d.default",
    "adaptive_max_pool3d.default",
    "max_pool2d_with_indices.default",
    "max_pool3d_with_indices.default",
    "upsample_nearest1d.vec",
    "upsample_nearest2d.vec",
    "upsample_nearest3d.vec",
    "upsample_bilinear2d.vec",
    "upsample_linear1d.vec",
    "upsample_bicubic2d.vec",
    "upsample_trilinear3d.vec",
    "upsample_nearest2d.default",
    "upsample_bilinear2d.default",
    "_upsample_bilinear2d_aa.default",
    "reflection_pad2d.default",
    "replication_pad2d.default",
    "reflection_pad1d.default",
    "replication_pad1d.default",
)


@rule(*POOL_LIKE)
def spatial(ctx: RuleContext, node: Node):
    """Pooling, resizing and spatial padding mix only the dims after the channel dim."""
    x = node.args[0]
    lab = ctx.labels(x)
    vals = node.meta.get("val")
    multi = isinstance(vals, (tuple, list))
    oshape = tuple(vals[0].shape) if multi else ctx.shape(node)
    factors = []
    if lab is not None:
        for f in lab.factors:
            if all(d <= 1 for d in f.dims):
                factors.append(f)
            else:
                ctx.coupler.freeze(f.ids, f"{where(node)}: labels on a spatial dimension")
    out = TensorLabels(oshape, factors)
    if multi:
        return [out, TensorLabels(tuple(vals[1].shape), list(factors))]
    return out


@rule(*ops("pad.default", "constant_pad_nd.default"))
def pad(ctx: RuleContext, node: Node):
    """Padding a channel dim adds fixed positions; padding other dims leaves labels alone."""
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None:
        return None
    factors = []
    for f in lab.factors:
        if any(shape[d] != oshape[d] for d in f.dims):
            ctx.coupler.freeze(f.ids, f"{where(node)}: pads a channel dim")
        else:
            factors.append(f)
    return TensorLabels(oshape, factors)


@rule(operator.getitem)
def getitem(ctx: RuleContext, node: Node):
    src, idx = node.args
    labs = ctx.labels_of.get(src) if isinstance(src, Node) else None
    if isinstance(labs, list) and isinstance(idx, int) and idx < len(labs):
        return labs[idx]
    return None


@rule(*ops("index_select.default"))
def index_select(ctx: RuleContext, node: Node):
    """``index_select(x, dim, idx)`` picks positions of one dim by value: that dim stays whole
    (a position table looked up by position ids), the others keep their labels."""
    x, dim, idx = node.args[:3]
    if isinstance(idx, Node):
        ctx.coupler.freeze_labels(ctx.labels(idx), f"{where(node)}: index tensor")
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    if lab is None or shape is None or oshape is None or not isinstance(dim, int):
        return None
    d = dim % max(len(shape), 1)
    factors = []
    for f in lab.factors:
        if d not in f.dims:
            factors.append(f)
            continue
        ctx.coupler.require_intact(f, f.axis_of(d), f"{where(node)}: indexes a channel dim")
        if len(f.dims) > 1:
            factors.append(ctx.coupler.coarsen(f, [f.axis_of(e) for e in f.dims if e != d]))
    return TensorLabels(oshape, factors)


@rule(*ops("index.Tensor"))
def index(ctx: RuleContext, node: Node):
    """Advanced indexing picks positions by value: indexed labelled dims stay whole, the others
    keep their labels (``table[:, idx]``: a per-head table indexed by relative position keeps
    its head dim, pruned with the heads it is added to).

    The dims not indexed move as torch moves them: with one block of adjacent index tensors, the
    broadcast index dims replace that block; otherwise they come first.
    """
    x = node.args[0]
    lab, shape, oshape = ctx.labels(x), ctx.shape(x), ctx.shape(node)
    indices = list(node.args[1])
    for i in indices:  # the index values pick positions: labels on them cannot follow
        if isinstance(i, Node):
            ctx.coupler.freeze_labels(ctx.labels(i), f"{where(node)}: index tensor")
    if lab is None or shape is None or oshape is None:
        return None
    touched = [d for d, i in enumerate(indices) if i is not None]
    if not touched:
        return TensorLabels(oshape, list(lab.factors))
    kept = [d for d in range(len(shape)) if d not in touched]
    n_index = len(oshape) - len(kept)  # rank of the broadcast index shape
    if n_index < 0:
        ctx.coupler.freeze_labels(lab, f"{where(node)}: advanced indexing")
        return TensorLabels(oshape, [])
    adjacent = touched == list(range(touched[0], touched[-1] + 1))
    if adjacent:
        moved = {d: d if d < touched[0] else d - len(touched) + n_index for d in kept}
    else:
        moved = {d: n_index + k for k, d in enumerate(kept)}
    factors = []
    for f in lab.factors:
        hit = [d for d in f.dims if d in touched]
        for d in hit:
            ctx.coupler.require_intact(f, f.axis_of(d), f"{where(node)}: indexes a channel dim")
        if len(hit) == len(f.dims):
            continue
        if hit:
            f = ctx.coupler.coarsen(f, [f.axis_of(d) for d in f.dims if d not in touched])
        factors.append(f.with_dims(tuple(moved[d] for d in f.dims)))
    return TensorLabels(oshape, factors)
