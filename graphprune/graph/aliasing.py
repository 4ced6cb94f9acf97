"""Which inputs of a traced graph its ops write into (through views).

A forward that writes into a parameter, a buffer or an input (``weight.clamp_()``,
``embedding_renorm_`` from ``max_norm``, a cache updated in place) must not be run on tensors that
share the user's memory: graphprune then runs it on copies. In-place ops on activations
(``ReLU(inplace=True)``, ``hardswish_``) write only into memory the forward made itself; telling
the two apart saves copying every weight of most CNNs.
"""

from __future__ import annotations

import operator

import torch


def storage_ptr(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (tensors that view the same memory share it); None if none."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def view_base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose memory ``node`` views (through view ops, in-place ops and the items of a
    view list such as ``split``'s), or ``node`` itself."""
    seen = 0
    while node.op == "call_function" and seen < 10_000:
        if node.target is operator.getitem:
            parent = node.args[0] if node.args else None
            if not isinstance(parent, torch.fx.Node):
                break
            node = parent
            seen += 1
            continue
        schema = getattr(node.target, "_schema", None)
        returns = schema.returns if schema is not None else []
        aliased = any(r.alias_info is not None for r in returns)
        if not aliased or not node.args or not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
        seen += 1
    return node


def written_values(schema: torch.FunctionSchema, args: tuple, kwargs: dict) -> list:
    """The arguments (graph nodes or tensors, lists flattened) an op with ``schema`` writes into
    (alias annotations ``Tensor(a!)``), for the call ``op(*args, **kwargs)``."""
    if not schema.is_mutable:
        return []
    named = dict(kwargs)
    for arg, value in zip(schema.arguments, args, strict=False):
        named[arg.name] = value
    out = []
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = named.get(arg.name)
            out += list(value) if isinstance(value, (list, tuple)) else [value]
    return [v for v in out if v is not None]


def written_arguments(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph values ``node``'s op writes into."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return []
    return [v for v in written_values(schema, node.args, node.kwargs) if isinstance(v, torch.fx.Node)]


def written_inputs(program: torch.export.ExportedProgram) -> set[str] | None:
    """Names of the placeholders (parameters, buffers, constants, inputs) an op of the program
    writes into; None when that cannot be told: a write inside a wrapped region (a subgraph
    whose inputs are not the program's), or through an argument that is not a graph value."""
    written: set[str] = set()
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for n in gm.graph.nodes:
            schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
            if schema is None or not schema.is_mutable:
                continue
            if gm is not program.graph_module:
                return None
            targets = written_arguments(n)
            if not targets:
                return None  # mutable, but its written argument is not a graph value
            for t in targets:
                base = view_base(t)
                if base.op == "placeholder":
                    written.add(base.name)
                elif base.op != "call_function":
                    return None
    return written
