"""Residual branches one at a time: an attention or MLP sub-layer removed on its own.

``graphprune.graph.blocks`` removes the module that performs residual adds (a whole decoder layer).
Here each residual add is its own unit, for models whose sub-layers are worth removing
separately (attention costs more than the MLP at long sequence lengths). The module keeps
running, so the branch must be replaced by modules that compute "nothing" cheaply:

1. the branch's *last module* is the outermost module that dies with the branch (rule 2 of
   ``graphprune.graph.blocks``) and produces ``f``; it must be called once, with a first tensor input
   of ``f``'s shape, and return ``f`` (alone, or in a tuple whose other entries are None). It is
   replaced by ``Zero``, which returns zeros like that input in the same structure, so
   ``x + f`` becomes ``x + 0 = x`` exactly;
2. every other module that dies with the branch and returns its input's shape (a norm in front
   of the sub-layer) is replaced by ``Skip``; dead modules that change shapes stay (their work
   is wasted, never wrong), and their tensors are not counted as removed.

Anything else is reported with the reason, and the result is checked against the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import Node

from graphprune.graph.blocks import Block, Residual, live_nodes, module_io, output_projections, residuals
from graphprune.graph.trace import Traced


def _calls(graph: torch.fx.Graph) -> dict[str, tuple[set[Node], set[str]]]:
    """Module path -> (its nodes, the distinct call keys it appears under)."""
    out: dict[str, tuple[set[Node], set[str]]] = {}
    for n in graph.nodes:
        for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
            nodes, keys = out.setdefault(path, (set(), set()))
            nodes.add(n)
            keys.add(key)
    return out


def _zero_spec(out: Any, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """Where ``f`` sits in the module's output: {"at", "leaves"} (leaves 0: a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return {"at": 0, "leaves": 0} if tuple(out.shape) == shape else None
    if isinstance(out, tuple) and out and type(out) is tuple:
        tensors = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
        if len(tensors) == 1 and all(v is None for i, v in enumerate(out) if i != tensors[0]) \
                and tuple(out[tensors[0]].shape) == shape:
            return {"at": tensors[0], "leaves": len(out)}
    return None


def find_branches(traced: Traced, model: nn.Module, example_input: Any, start: int = 0) -> list[Block]:
    """One Block per residual add (kind "branch"), removable or with the reason it is not."""
    graph = traced.program.graph
    found = residuals(graph)
    before = live_nodes(graph, {})
    calls = _calls(graph)
    plans = []
    for r in found:
        live = live_nodes(graph, {r.add: r.skip})
        dead_paths = [p for p, (nodes, _) in calls.items()  # nothing of it live after, something before
                      if p and nodes & before and not nodes & live and r.add not in nodes]
        outer = [p for p in dead_paths if not any(p.startswith(q + ".") for q in dead_paths)]
        plans.append((r, live, outer))
    wanted = {p for _, _, outer in plans for p in outer}
    io = module_io(model, wanted, example_input) if wanted else {}
    blocks = []
    for r, live, outer in plans:
        owned = sorted({traced.param_names[n.name] for n in before - live
                        if n.op == "placeholder" and n.name in traced.param_names})
        block = Block(start + len(blocks), _module_of(r.add), [r.add.name], [r.skip.name], owned, outer,
                      output_projections(r, traced), kind="branch")
        block.reason = _realise(block, r, outer, calls, io)
        blocks.append(block)
    return blocks


def _module_of(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _realise(block: Block, r: Residual, outer: list[str], calls: dict, io: dict) -> str | None:
    """Fill in the branch's stand-ins (rules 1-2 of the module docstring); the reason if none fit."""
    if not block.params:
        return "its branch owns no parameters"
    holding = [p for p in outer if r.branch in calls[p][0]]
    if len(holding) != 1:
        return "its branch's last op is not inside a module that goes with it"
    last = holding[0]
    nodes, keys = calls[last]
    if len(keys) != 1:
        return f"{last} is called more than once"
    if [n for n in nodes if any(u not in nodes for u in n.users)] != [r.branch]:
        return f"{last} has outputs other than the branch"
    shape = tuple(r.branch.meta["val"].shape)
    first, out = io.get(last, (None, None))
    spec = _zero_spec(out, shape) if first == shape else None
    if spec is None:
        return f"{last} does not return one tensor of its first input's shape (it cannot become Zero)"
    block.zero = {"module": last, **spec}
    block.module = last  # the sub-layer is what the user sees go
    kept: list[str] = []
    for p in outer:
        if p == last:
            continue
        first, out = io.get(p, (None, None))
        if isinstance(out, torch.Tensor) and first == tuple(out.shape) and len(calls[p][1]) == 1:
            block.skipped.append(p)
        else:
            kept.append(p)
    block.params = [n for n in block.params if not any(n.startswith(k + ".") for k in kept)]
    block.modules = [p for p in outer if p not in kept]
    return None
