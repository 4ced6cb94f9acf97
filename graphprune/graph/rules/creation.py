"""Rules for ops that make a tensor from another one's shape, dtype or device, not its values.

* ``x.new_zeros(size)`` and the other ``new_*`` ops (Swin's shifted-window mask,
  ``x.new_zeros((pad_H, pad_W))``): only ``x``'s dtype and device are read, so ``x``'s channels
  are free and the result is a fresh tensor of the given, fixed size (unlabelled, like
  ``torch.zeros``; where it meets pruned channels, those keep their size).
* ``torch.zeros_like(x)``, ``x.zero_()``, ``x.fill_(v)`` and the other ``*_like`` / in-place
  fills (Swin-V2 zeroes the key third of its qkv bias in place): the result has ``x``'s shape,
  position for position, so it keeps ``x``'s labels. An in-place fill changes values, never
  which position holds which channel.

Without these rules each was a boundary, and the channels of ``x`` kept their size.
"""

from __future__ import annotations

from torch.fx import Node

from graphprune.graph.labels import TensorLabels
from graphprune.graph.rules.registry import RuleContext, ops, rule, where

NEW = ops(
    "new_zeros.default",
    "new_ones.default",
    "new_empty.default",
    "new_full.default",
    "new_empty_strided.default",
)

LIKE = ops(
    "zeros_like.default",
    "ones_like.default",
    "empty_like.default",
    "full_like.default",
    "rand_like.default",
    "randn_like.default",
    "zero_.default",
    "zero.default",
    "fill_.Scalar",
    "fill.Scalar",
    "bernoulli_.float",
    "bernoulli.p",
)


@rule(*NEW)
def new_tensor(ctx: RuleContext, node: Node):
    """A fresh tensor of a size given as constants: no channel of the source flows into it."""
    shape = ctx.shape(node)
    return None if shape is None else TensorLabels(shape, [])


@rule(*LIKE)
def like(ctx: RuleContext, node: Node):
    """A tensor of the source's shape (filled, or the source filled in place): its labels."""
    lab = ctx.labels(node.args[0])
    shape = ctx.shape(node)
    if shape is None:
        return None
    if lab is None:
        return TensorLabels(shape, [])
    if tuple(lab.shape) != tuple(shape):  # not what these ops do: keep the source's channels whole
        ctx.coupler.freeze_labels(lab, f"{where(node)}: result of another shape than its source")
        return TensorLabels(shape, [])
    return TensorLabels(shape, list(lab.factors))
