"""Rules for the ops behind nn layers: convolution, linear, normalisation, embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from graphprune.graph.labels import FIXED, Factor, TensorLabels
from graphprune.graph.rules.algebra import LETTERS, einsum_labels
from graphprune.graph.rules.registry import RuleContext, ops, rule, where


def channel_ids(ctx: RuleContext, lab: TensorLabels | None, dim: int, size: int, why: str) -> np.ndarray:
    """1-D ids along ``dim``; FIXED where unlabelled. A joint factor there must keep other axes."""
    if lab is None:
        return np.full(size, FIXED, dtype=np.int64)
    f = lab.factor_at(dim)
    if f is None:
        return np.full(size, FIXED, dtype=np.int64)
    if len(f.dims) == 1:
        return f.ids
    f = ctx.coupler.coarsen(f, [f.axis_of(dim)])
    return f.ids


def _passthrough_other_dims(
    ctx: RuleContext, lab: TensorLabels | None, skip: set[int], why: str
) -> list[Factor]:
    """Keep the batch-dim labels of an input, freeze labels on dims the op mixes (spatial)."""
    out = []
    if lab is None:
        return out
    for f in lab.factors:
        if set(f.dims) & skip:
            continue
        if f.dims == (0,):
            out.append(f)
        else:
            ctx.coupler.freeze(f.ids, f"{why}: labels on a spatial dimension")
    return out


CONV = ops(
    "conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding", "conv3d.padding"
)
CONV_T = ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input")
CONVOLUTION = ops("convolution.default")


@rule(*CONV, *CONV_T, *CONVOLUTION)
def convolution(ctx: RuleContext, node: Node):
    """Output channels are the weight's dim 0 (dim 1 if transposed); input channels its dim 1.

    Grouped convolutions are pruned by whole groups: the input and output channels of group g
    become one unit, so the kept model has fewer groups of the same width (depthwise convs lose
    channels one by one).
    """
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    transposed = node.target in CONV_T
    groups = 1
    if node.target in CONVOLUTION:
        transposed = bool(node.args[6])
        groups = int(node.args[8])
    elif node.target in CONV_T:
        groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    else:
        groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    why = where(node)
    xshape, wshape, oshape = ctx.shape(x), ctx.shape(w), ctx.shape(node)
    lab = ctx.labels(x)
    cin = xshape[1]
    x_ids = channel_ids(ctx, lab, 1, cin, why)
    out_dim_w = 1 if transposed else 0
    in_dim_w = 0 if transposed else 1
    out_ids = ctx.weight_ids(w, out_dim_w)
    in_ids = ctx.weight_ids(w, in_dim_w) if groups == 1 else None
    if out_ids is None:  # weight computed at run time, no label says which row is which
        ctx.coupler.freeze(x_ids, f"{why}: weight is not a parameter")
        return TensorLabels(oshape, [])
    if groups == 1 and in_ids is None:  # the weight's input dim is fixed (merged away, computed)
        ctx.coupler.freeze(x_ids, f"{why}: the weight's input channels carry no labels")
    w_lab = ctx.labels(w) if ctx.param_ids(w, 0) is None else None
    for f in w_lab.factors if w_lab is not None else ():  # a view's kernel taps: never channels
        if not set(f.dims) <= {0, 1}:
            ctx.coupler.freeze(f.ids, f"{why}: kernel taps")
    if transposed and groups > 1:
        ctx.coupler.freeze(x_ids, f"{why}: grouped transposed convolution")
        ctx.coupler.freeze(out_ids, f"{why}: grouped transposed convolution")
        return TensorLabels(oshape, [])
    b_ids = ctx.weight_ids(b, 0) if b is not None else None
    if b_ids is None and isinstance(b, Node):  # a bias computed at run time: added per channel
        b_lab = ctx.labels(b)
        f = b_lab.factor_at(0) if b_lab is not None else None
        b_ids = f.ids if f is not None and f.dims == (0,) else None
        if f is not None and b_ids is None:
            ctx.coupler.freeze(out_ids, f"{why}: incompatible channel layouts")
    if b_ids is not None:
        ctx.coupler.union(out_ids, b_ids)
    if groups == 1:
        if in_ids is not None:
            ctx.coupler.union(x_ids, in_ids)
    else:
        cout = oshape[1]
        rep = out_ids.reshape(groups, cout // groups)[:, :1]
        ctx.coupler.union(out_ids.reshape(groups, cout // groups), rep)
        ctx.coupler.union(x_ids.reshape(groups, cin // groups), rep)
    factors = _passthrough_other_dims(ctx, lab, {1}, why)
    factors.append(Factor((1,), out_ids))
    del wshape
    return TensorLabels(oshape, factors)


@rule(*ops("linear.default"))
def linear(ctx: RuleContext, node: Node):
    """``y = x @ W.T + b``: the einsum ``...k,nk->...n`` plus the bias on ``n``."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    xshape, wshape, oshape = ctx.shape(x), ctx.shape(w), ctx.shape(node)
    r = len(xshape)
    xl = LETTERS[: r - 1] + "Z"
    wl = "YZ"
    out_letters = LETTERS[: r - 1] + "Y"
    operands = [(ctx.labels(x), xshape, xl), (ctx.labels(w), wshape, wl)]
    if b is not None and ctx.shape(b) is not None:
        operands.append((ctx.labels(b), ctx.shape(b), "Y"))
    return einsum_labels(ctx.coupler, operands, out_letters, oshape, where(node))


BATCH_NORM = ops(
    "batch_norm.default",
    "_native_batch_norm_legit_no_training.default",
    "_native_batch_norm_legit_functional.default",
    "_native_batch_norm_legit.default",
    "native_batch_norm.default",
    "instance_norm.default",
)


def _per_channel(ctx: RuleContext, node: Node, ids, params, lab, xshape) -> Any:
    """A norm's affine parameters and statistics follow its channel ``ids``; x's labels pass through
    (the first output of the multi-output variants; mean/rstd outputs carry none)."""
    for arg in params:
        pid = ctx.param_ids(arg, 0)
        if pid is not None:
            ctx.coupler.union(ids, pid)
    out = TensorLabels(xshape, list(lab.factors) if lab else [])
    vals = node.meta.get("val")
    return [out] + [None] * (len(vals) - 1) if isinstance(vals, (tuple, list)) else out


@rule(*BATCH_NORM)
def batch_norm(ctx: RuleContext, node: Node):
    """Per-channel statistics and affine parameters all follow channel dim 1 (exact).

    Statistics computed from the input (training mode, ``instance_norm``, or BiT's weight
    standardisation: ``batch_norm(w.reshape(1, out, -1), None, None, training=True)``) reduce
    over every other dim: channels labelled there change the statistic when pruned, so they
    are pruned only with ``prune_hidden=True``, like a LayerNorm's."""
    x = node.args[0]
    lab = ctx.labels(x)
    xshape = ctx.shape(x)
    why = where(node)
    ids = channel_ids(ctx, lab, 1, xshape[1], why)
    from_input = node.target not in ops("_native_batch_norm_legit_no_training.default") and (
        len(node.args) > 5 and bool(node.args[5]))
    for f in lab.factors if from_input and lab is not None else ():
        if set(f.dims) != {1}:
            ctx.coupler.soft_freeze(f.ids, f"{why} computes statistics over these channels")
    return _per_channel(ctx, node, ids, node.args[1:5], lab, xshape)


NORM_LAST = ops("layer_norm.default", "native_layer_norm.default", "rms_norm.default")


@rule(*NORM_LAST)
def layer_norm(ctx: RuleContext, node: Node):
    """Normalises over the trailing dims: affine params follow them; statistics change if pruned.

    Removing channels a LayerNorm normalises over changes its mean/variance, so those channels
    (the residual stream of a transformer) are pruned only with ``prune_hidden=True``.
    """
    x = node.args[0]
    ns = list(node.args[1])
    lab = ctx.labels(x)
    xshape = ctx.shape(x)
    why = where(node)
    if len(ns) != 1:
        ctx.coupler.freeze_labels(lab, f"{why}: normalises over several dims")
        for arg in node.args[2:4]:
            for d in range(len(ns)):
                pid = ctx.param_ids(arg, d)
                if pid is not None:
                    ctx.coupler.freeze(pid, why)
        return TensorLabels(xshape, [])
    last = len(xshape) - 1
    ids = channel_ids(ctx, lab, last, xshape[last], why)
    ctx.coupler.soft_freeze(ids, f"{why} normalises over these channels")
    return _per_channel(ctx, node, ids, node.args[2:4], lab, xshape)


@rule(*ops("group_norm.default", "native_group_norm.default"))
def group_norm(ctx: RuleContext, node: Node):
    """GroupNorm: whole groups are units, so the kept groups' statistics are unchanged (exact)."""
    x = node.args[0]
    lab = ctx.labels(x)
    xshape = ctx.shape(x)
    if node.target in ops("group_norm.default"):
        groups, w, b = int(node.args[1]), node.args[2], node.args[3]
    else:
        w, b, groups = node.args[1], node.args[2], int(node.args[6])
    c = xshape[1]
    ids = channel_ids(ctx, lab, 1, c, where(node))
    grid = ids.reshape(groups, c // groups)
    ctx.coupler.union(grid, grid[:, :1])
    return _per_channel(ctx, node, ids, (w, b), lab, xshape)


@rule(*ops("embedding.default"))
def embedding(ctx: RuleContext, node: Node):
    """Rows are looked up by token id (never pruned); the embedding dim is a channel dim."""
    w = node.args[0]
    oshape = ctx.shape(node)
    pid = ctx.param_ids(w, 1)
    if pid is None:
        return TensorLabels(oshape, [])
    return TensorLabels(oshape, [Factor((len(oshape) - 1,), pid)])
