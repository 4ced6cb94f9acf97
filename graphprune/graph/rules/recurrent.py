"""Rules for recurrent layers: ``aten.lstm``, ``aten.gru``, ``aten.rnn_tanh`` / ``rnn_relu``.

A recurrent layer is one ATen op holding every layer's and direction's weights. Its hidden unit
``j`` lives in ``G`` rows of each weight (one per gate: ``G = 4`` for LSTM's i, f, g, o, 3 for
GRU's r, z, n, 1 for a plain RNN) at ``g * H + j``, in column ``j`` of the recurrent weight
``weight_hh``, and in position ``j`` of the hidden state. Removing a unit removes all of these
together, gate by gate, which is exact for a unit that is dead (all its rows zero: it stays 0).

``nn.LSTM`` / ``nn.GRU`` keep one ``hidden_size`` for every layer and direction, so unit ``j`` is
coupled across layers and directions: the module stays an ``nn.LSTM`` of a smaller hidden size.
LSTMs with ``proj_size`` are frozen (the projection couples the units to another width).
"""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from graphprune.graph.labels import Factor, TensorLabels
from graphprune.graph.rules.nn import channel_ids
from graphprune.graph.rules.registry import RuleContext, ops, rule, where

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
RNN_OPS = ops("lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input")


def _kind(node: Node) -> str:
    return node.target.__name__.split(".")[0]


def _freeze_all(ctx: RuleContext, node: Node, params: list, why: str) -> list:
    ctx.coupler.freeze_labels(ctx.labels(node.args[0]), why)
    for p in params:
        for d, _ in enumerate(ctx.shape(p) or ()):
            pid = ctx.param_ids(p, d)
            if pid is not None:
                ctx.coupler.freeze(pid, why)
    return [TensorLabels(tuple(v.shape), []) for v in node.meta["val"]]


def _hidden_state_ok(ctx: RuleContext, hx: object, ids: np.ndarray, why: str) -> None:
    """An initial state must follow the hidden units: labelled -> coupled, else made inside."""
    for h in hx if isinstance(hx, (list, tuple)) else [hx]:
        if not isinstance(h, Node):
            continue
        lab = ctx.labels(h)
        shape = ctx.shape(h)
        f = lab.factor_at(len(shape) - 1) if lab is not None else None
        if f is not None:
            ctx.coupler.union(channel_ids(ctx, lab, len(shape) - 1, shape[-1], why), ids)
        elif h.op == "call_function" and "zeros" in str(h.target):
            continue  # nn.LSTM builds zeros of its own hidden_size: it follows the units
        else:
            ctx.coupler.freeze(ids, f"{why}: the initial hidden state has a fixed size")


@rule(*RNN_OPS)
def recurrent(ctx: RuleContext, node: Node):
    """(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)."""
    x, hx, params = node.args[0], node.args[1], list(node.args[2])
    has_biases, layers, bidirectional = bool(node.args[3]), int(node.args[4]), bool(node.args[7])
    why = where(node)
    dirs = 2 if bidirectional else 1
    gates = _GATES[_kind(node)]
    per = len(params) // (layers * dirs)
    if per != 2 + 2 * has_biases or any(ctx.param_ids(p, 0) is None for p in params):
        why = f"{why}: projections (proj_size) or weights computed at run time"
        return _freeze_all(ctx, node, params, why)
    hidden = ctx.shape(params[1])[1]
    unit = None  # ids of hidden unit j, shared by every layer and direction
    outputs: list[np.ndarray] = []  # hidden ids of each direction of the previous layer
    xshape = ctx.shape(x)
    x_ids = channel_ids(ctx, ctx.labels(x), len(xshape) - 1, xshape[-1], why)
    for layer in range(layers):
        in_ids = x_ids if layer == 0 else np.concatenate(outputs)
        outputs = []
        for d in range(dirs):
            chunk = params[(layer * dirs + d) * per : (layer * dirs + d + 1) * per]
            w_ih, w_hh = chunk[0], chunk[1]
            rows = ctx.param_ids(w_ih, 0).reshape(gates, hidden)
            ctx.coupler.union(rows, rows[:1])  # every gate's row j is unit j
            for p in chunk[1:]:
                ctx.coupler.union(ctx.param_ids(p, 0).reshape(gates, hidden), rows[:1])
            ctx.coupler.union(ctx.param_ids(w_hh, 1), rows[0])  # the recurrent input is unit j
            ctx.coupler.union(ctx.param_ids(w_ih, 1), in_ids)
            if unit is None:
                unit = rows[0]
            ctx.coupler.union(rows[0], unit)
            outputs.append(rows[0])
    _hidden_state_ok(ctx, hx, unit, why)
    for lab in [ctx.labels(x)]:
        for f in lab.factors if lab is not None else []:
            if len(xshape) - 1 not in f.dims:
                ctx.coupler.freeze(f.ids, f"{why}: labels on the batch or time dimension")
    vals = node.meta["val"]
    out = [TensorLabels(tuple(vals[0].shape), [Factor((len(vals[0].shape) - 1,), np.concatenate(outputs))])]
    out += [TensorLabels(tuple(v.shape), [Factor((2,), unit)]) for v in vals[1:]]
    return out
