"""Per-ATen-op channel rules.

A rule is a small function ``rule(ctx, node) -> labels`` registered for one or more ATen ops.
It reads the labels of the node's inputs (``ctx.labels``), records couplings through
``ctx.coupler`` and returns the labels of the node's output (a ``TensorLabels``, a list of them
for multi-output ops, or ``None`` for non-tensor results).

An op with no rule is a *boundary*: everything flowing through it is frozen and the plan says
which op froze what. Rules never guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphprune.graph.labels import Coupler, Factor, TensorLabels

Labels = TensorLabels | list[Any] | None
RuleFn = Callable[["RuleContext", Node], Labels]

_RULES: dict[Any, RuleFn] = {}


def rule(*targets: Any) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the rule for every op in ``targets``; a second rule for an op is a bug."""

    def register(fn: RuleFn) -> RuleFn:
        for target in targets:
            if target in _RULES:
                raise RuntimeError(f"duplicate graphprune rule for {target}")
            _RULES[target] = fn
        return fn

    return register


def ops(*names: str) -> list[Any]:
    """Resolve ``"aten::name.overload"``-style names, skipping ones this torch build lacks."""
    found = []
    for name in names:
        base, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, base, None)
        if packet is None:
            continue
        op = getattr(packet, overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def lookup(target: Any) -> RuleFn | None:
    return _RULES.get(target)


# ops that only move or pick out their first argument's values (``RuleContext.from_weight``)
_WEIGHT_MOVES = frozenset({
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "slice", "select", "index", "index_select", "clone", "contiguous", "alias", "_to_copy", "to",
})


@dataclass
class RuleContext:
    """What a rule may see: input labels, shapes, parameter names, and the coupler."""

    coupler: Coupler
    labels_of: dict[Node, Labels]
    param_names: dict[Node, str]
    options: dict[str, Any]

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(int(s) for s in val.shape)
        return None

    def labels(self, arg: Any) -> TensorLabels | None:
        """Labels of a tensor argument; parameters are labelled on every dimension of size > 1."""
        if not isinstance(arg, Node):
            return None
        if arg in self.param_names:
            shape = self.shape(arg)
            if shape is None:
                return None
            if not arg.meta["val"].dtype.is_floating_point:  # index buffers (position ids...)
                return TensorLabels(shape, [])
            name = self.param_names[arg]
            factors = [Factor((d,), self.coupler.param(name, d, n)) for d, n in enumerate(shape) if n > 1]
            return TensorLabels(shape, factors)
        lab = self.labels_of.get(arg)
        return lab if isinstance(lab, TensorLabels) else None

    def from_weight(self, arg: Any) -> bool:
        """True for a parameter, or values moved or picked out of one parameter and nothing else
        (views, transposes, ``weight[expert_ids]``): a product with such an operand is a layer's
        weight product, not two activations meeting (per-expert weights gathered by routing)."""
        seen = 0
        while isinstance(arg, Node) and seen < 32:
            if arg in self.param_names:
                return bool(arg.meta["val"].dtype.is_floating_point)
            name = getattr(getattr(arg.target, "overloadpacket", None), "__name__", None)
            if arg.op != "call_function" or name not in _WEIGHT_MOVES or not arg.args:
                return False
            arg, seen = arg.args[0], seen + 1
        return False

    def weight_ids(self, arg: Any, dim: int):
        """Ids of one dimension of a parameter, or of a weight computed from parameters whose
        labels carry that dimension alone: a view (Mamba's ``conv1d.weight.view(C, K)`` handed to
        a functional convolution) or a function of one (BiT's standardised weights, ``(w - mean)
        / std`` per output channel: its rows are the parameter's rows; the statistic over the
        input channels soft-freezes those). None when no label says which channel is which."""
        ids = self.param_ids(arg, dim)
        if ids is not None:
            return ids
        lab = self.labels(arg)
        f = lab.factor_at(dim) if lab is not None else None
        return f.ids if f is not None and f.dims == (dim,) else None

    def param_ids(self, arg: Any, dim: int):
        """Ids of one dimension of a parameter argument, or None if ``arg`` is not a parameter."""
        if isinstance(arg, Node) and arg in self.param_names:
            shape = self.shape(arg)
            return self.coupler.param(self.param_names[arg], dim, shape[dim])
        return None


def module_path(node: Node) -> str:
    """Dotted path of the innermost module whose forward ran ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def int_attributes(model: Any, path: str) -> list[tuple[str, int]]:
    """Public integer attributes of module ``path``: the sizes a forward may read (num_heads...)."""
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return []
    return [(a, v) for a, v in vars(mod).items() if not a.startswith("_") and type(v) is int]


def where(node: Node) -> str:
    """Human-readable location of a node: op and module path, used in freeze reasons."""
    path = module_path(node)
    op = getattr(node.target, "__name__", str(node.target))
    return f"{op} in {path}" if path else op

