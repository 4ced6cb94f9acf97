"""Did the compact model take another code path? Compare the ops two traced programs run.

Why this module exists: a forward that branches on a tensor size (``if y.shape[1] == 8:``) is
traced at the original sizes; at the pruned sizes the same Python code may take the other
branch. The compact model then runs fine but computes something else, and verification, which
holds it to the original program, reports a mismatch that no pruning rule caused. The original
and the compact model come from the same code, so they must run the same ATen ops in the same
order; where they do not, the code path changed, and the error should say so (and where) instead
of blaming graphprune.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import Node

from graphprune.graph.copies import eval_copy
from graphprune.graph.rules.registry import module_path
from graphprune.graph.trace import trace


def _ops(program: torch.export.ExportedProgram) -> list[Node]:
    return [n for n in program.graph.nodes if n.op == "call_function"]


def _describe(node: Node | None) -> str:
    if node is None:
        return "nothing (its forward ends earlier)"
    op = getattr(node.target, "__name__", str(node.target))
    path = module_path(node)
    return f"{op} in {path!r}" if path else f"{op} in the model's own forward"


def code_path_change(
    original: torch.export.ExportedProgram, small: nn.Module, example_input: Any
) -> str | None:
    """None if ``small`` runs the ops of ``original`` in the same order; else what differs, and the fix.

    Traces a copy of ``small`` (one torch.export call, only on the path of a failed check); a
    model that cannot be traced gives None (no evidence either way).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = trace(eval_copy(small), example_input).program
    except Exception:  # noqa: BLE001 - no trace, no comparison: the caller's message stands
        return None
    a, b = _ops(original), _ops(again)
    if [n.target for n in a] == [n.target for n in b]:
        return None
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x.target != y.target), min(len(a), len(b)))
    first = _describe(a[k] if k < len(a) else None)
    now = _describe(b[k] if k < len(b) else None)
    return (
        f"The compact model runs other ops than the original: op {k} of the original is {first}, "
        f"where the compact model runs {now} ({len(a)} vs {len(b)} ops in all). So Python code there "
        "branches on a tensor size (`if x.shape[1] == 8:`) that pruning changed: make the branch "
        "independent of the pruned widths (compare with a size stored in __init__), or keep the "
        "layers whose width it reads whole with ignored_layers=[...]."
    )
