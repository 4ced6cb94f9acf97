"""Rules for elementwise ops, activations, reductions and normalisations over a dimension."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.fx import Node

from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.algebra import LETTERS, broadcast_letters, einsum_labels
from graphprune.graph.rules.registry import RuleContext, ops, rule, where

UNARY = ops(
    "relu.default",
    "relu_.default",
    "relu6.default",
    "gelu.default",
    "silu.default",
    "silu_.default",
    "sigmoid.default",
    "tanh.default",
    "hardtanh.default",
    "hardtanh_.default",
    "hardswish.default",
    "hardswish_.default",
    "hardsigmoid.default",
    "hardsigmoid_.default",
    "leaky_relu.default",
    "leaky_relu_.default",
    "elu.default",
    "selu.default",
    "celu.default",
    "mish.default",
    "softplus.default",
    "neg.default",
    "exp.default",
    "abs.default",
    "sqrt.default",
    "rsqrt.default",
    "pow.Tensor_Scalar",
    "log.default",
    "sin.default",
    "cos.default",
    "erf.default",
    "reciprocal.default",
    "clamp.default",
    "clamp_min.default",
    "clamp_max.default",
    "dropout.default",
    "dropout_.default",
    "feature_dropout.default",
    "alpha_dropout.default",
    "clone.default",
    "contiguous.default",
    "to.dtype",
    "to.dtype_layout",
    "to.device",
    "_to_copy.default",
    "alias.default",
    "detach.default",
    "type_as.default",
    "lift_fresh_copy.default",
    "logical_not.default",
    "sign.default",
    "add.Scalar",
    "sub.Scalar",
    "mul.Scalar",
    "div.Scalar",
    "rsub.Scalar",
    "floor.default",
    "round.default",
    "gt.Scalar",
    "lt.Scalar",
    "ge.Scalar",
    "le.Scalar",
    "eq.Scalar",
    "ne.Scalar",
    "bitwise_not.default",
    "square.default",
    "log_sigmoid.default",
)


@rule(*UNARY)
def unary(ctx: RuleContext, node: Node):
    """Position-wise functions of one tensor keep every label where it was."""
    lab = ctx.labels(node.args[0])
    shape = ctx.shape(node)
    if lab is None or shape is None:
        return None
    return TensorLabels(shape, list(lab.factors))


BINARY = ops(
    "add.Tensor",
    "add_.Tensor",
    "sub.Tensor",
    "sub_.Tensor",
    "mul.Tensor",
    "mul_.Tensor",
    "div.Tensor",
    "div_.Tensor",
    "div.Tensor_mode",
    "maximum.default",
    "minimum.default",
    "max.other",
    "min.other",
    "fmax.default",
    "fmin.default",
    "pow.Tensor_Tensor",
    "where.self",
    "eq.Tensor",
    "ne.Tensor",
    "lt.Tensor",
    "le.Tensor",
    "gt.Tensor",
    "ge.Tensor",
    "__and__.Tensor",
    "__or__.Tensor",
    "logical_and.default",
    "logical_or.default",
    "masked_fill.Scalar",
    "masked_fill.Tensor",
    "rsub.Tensor",
    "atan2.default",
    "fmod.Tensor",
    "remainder.Tensor",
    "copysign.Tensor",
    "lerp.Tensor",
    "addcmul.default",
    "addcdiv.default",
    "prelu.default",
    "_prelu_kernel.default",
    "clamp.Tensor",
    "clamp_min.Tensor",
    "clamp_max.Tensor",
)


@rule(*BINARY)
def elementwise(ctx: RuleContext, node: Node):
    """Broadcasting elementwise ops: same-position channels of all tensor inputs are one unit."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    rank = len(out_shape)
    operands = []
    args = list(node.args)
    if node.target in ops("prelu.default", "_prelu_kernel.default"):
        return _prelu(ctx, node)
    for arg in [*args, *node.kwargs.values()]:  # clamp(x, min=t) may keep its bounds as keywords
        shape = ctx.shape(arg)
        if shape is None:
            continue
        operands.append((ctx.labels(arg), shape, broadcast_letters(len(shape), rank)))
    return einsum_labels(ctx.coupler, operands, LETTERS[:rank], out_shape, where(node))


def _prelu(ctx: RuleContext, node: Node):
    x, w = node.args[0], node.args[1]
    lab = ctx.labels(x)
    shape = ctx.shape(node)
    wshape = ctx.shape(w)
    if lab is None or shape is None:
        ctx.coupler.freeze_labels(ctx.labels(w), where(node))
        return None
    if wshape and wshape[0] > 1 and len(shape) > 1:
        f = lab.factor_at(1)
        wid = ctx.param_ids(w, 0)
        if f is not None and f.dims == (1,) and wid is not None:
            ctx.coupler.union(f.ids, wid)
        elif wid is not None:
            ctx.coupler.freeze(wid, f"{where(node)}: channel layout not tracked")
            if f is not None:
                ctx.coupler.require_intact(f, f.axis_of(1), where(node))
    return TensorLabels(shape, list(lab.factors))


REDUCE_EXACT = ops("sum.dim_IntList", "sum.default")
REDUCE_STAT = ops(
    "mean.dim",
    "mean.default",
    "var.correction",
    "var.dim",
    "std.correction",
    "std.dim",
    "amax.default",
    "amin.default",
    "max.dim",
    "min.dim",
    "logsumexp.default",
    "norm.ScalarOpt_dim",
    "linalg_vector_norm.default",
    "var_mean.correction",
    "argmax.default",
    "argmin.default",
    "prod.dim_int",
)


DIM_AT_2 = set(ops("linalg_vector_norm.default", "norm.ScalarOpt_dim"))  # (x, ord/p, dim, ...)


def reduced_dims(target: Any, args: Sequence[Any], kwargs: dict[str, Any], rank: int) -> list[int]:
    """Dims a reduction call reduces (positional or keyword ``dim``; none given = all dims).

    Shared by the rule and by verify's exact statistics, so both read an op the same way.
    """
    pos = 2 if target in DIM_AT_2 else 1
    dims = args[pos] if len(args) > pos else kwargs.get("dim")
    if dims is None or dims == [] or dims == ():
        return list(range(rank))
    if isinstance(dims, int):
        return [dims % rank]
    return sorted({int(d) % rank for d in dims})


@rule(*REDUCE_EXACT, *REDUCE_STAT)
def reduction(ctx: RuleContext, node: Node):
    """Reductions over dims: a joint factor partly reduced is merged along the reduced axes.

    Reducing *all* of a channel dimension with a statistic (mean, var, max) is not exact under
    pruning (the statistic changes), so those channels are frozen unless ``prune_hidden``.
    """
    x = node.args[0]
    lab = ctx.labels(x)
    shape = ctx.shape(x)
    if lab is None or shape is None:
        return None
    rank = len(shape)
    reduced = set(reduced_dims(node.target, node.args, node.kwargs, rank))
    keepdim = bool(node.kwargs.get("keepdim", False))
    for a in node.args[2:]:
        if isinstance(a, bool):
            keepdim = a
            break
    exact = node.target in REDUCE_EXACT
    factors = []
    for f in lab.factors:
        keep = [ax for ax, d in enumerate(f.dims) if d not in reduced]
        if not keep:
            msg = f"{where(node)} reduces over these channels"
            if node.target in ops("argmax.default", "argmin.default"):
                ctx.coupler.freeze(f.ids, msg)
            elif not exact:
                ctx.coupler.soft_freeze(f.ids, msg)
            continue
        if len(keep) < len(f.dims):
            f = ctx.coupler.coarsen(f, keep)
        factors.append(f)
    out = []
    for f in factors:
        if keepdim:
            out.append(f)
        else:
            new_dims = tuple(d - sum(1 for r in reduced if r < d) for d in f.dims)
            out.append(f.with_dims(new_dims))
    out_shape = ctx.shape(node)
    if out_shape is None:  # multi-output (max.dim, var_mean): labels for each value
        vals = node.meta.get("val")
        return (
            [TensorLabels(tuple(v.shape), list(out)) for v in vals]
            if isinstance(vals, (tuple, list))
            else None
        )
    return TensorLabels(out_shape, out)


SOFTMAX = ops(
    "softmax.int",
    "_softmax.default",
    "log_softmax.int",
    "_log_softmax.default",
    "cumsum.default",
    "cumprod.default",
    "sort.default",
    "topk.default",
    "flip.default",
    "roll.default",
)


# where the dims argument sits when it is not the second one: topk(x, k, dim), roll(x, shifts, dims)
_DIM_AT = {op: 2 for op in ops("topk.default", "roll.default")}
_DIM_NAME = {op: "dims" for op in ops("roll.default", "flip.default")}


def _mixed_dims(node: Node, rank: int) -> list[int]:
    """The dims ``node`` mixes positions along (every dim for ``roll`` without dims: it rolls the
    flattened tensor)."""
    at, name = _DIM_AT.get(node.target, 1), _DIM_NAME.get(node.target, "dim")
    default = [] if node.target in _DIM_NAME else -1
    dim_arg = node.args[at] if len(node.args) > at else node.kwargs.get(name, default)
    dims = [dim_arg] if isinstance(dim_arg, int) else list(dim_arg)
    if not dims and node.target in ops("roll.default"):
        return list(range(rank))
    return [d % rank for d in dims] if rank else []


@rule(*SOFTMAX)
def along_dim(ctx: RuleContext, node: Node):
    """Ops that mix positions along one dim (softmax, cumsum, flip...): that dim stays whole.

    A dim whose size the op changes (``topk``'s k of n) keeps no labels in the output: its
    positions are picked by value."""
    x = node.args[0]
    lab = ctx.labels(x)
    shape = ctx.shape(x)
    if lab is None or shape is None:
        return None
    dims = _mixed_dims(node, len(shape))
    for d in dims:
        f = lab.factor_at(d)
        if f is not None:
            ctx.coupler.require_intact(f, f.axis_of(d), f"{where(node)} mixes positions along dim {d}")

    def labels(out_shape: tuple[int, ...]) -> TensorLabels:
        if len(out_shape) != len(shape):
            return TensorLabels(out_shape, [])
        resized = {d for d in dims if out_shape[d] != shape[d]}
        return TensorLabels(out_shape, [f for f in lab.factors if resized.isdisjoint(f.dims)])

    out_shape = ctx.shape(node)
    if out_shape is None:
        vals = node.meta.get("val")
        if isinstance(vals, (tuple, list)):
            return [labels(tuple(v.shape)) for v in vals]
        return None
    return labels(out_shape)


@rule(
    *ops(
        "_assert_tensor_metadata.default",
        "_assert_scalar.default",
        "sym_constrain_range_for_size.default",
        "_assert_async.msg",
        "_functional_assert_async.msg",
    )
)
def assertion(ctx: RuleContext, node: Node):
    """Runtime checks inserted by torch.export: no data flows through them."""
    return None
