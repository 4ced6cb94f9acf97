"""Depth pruning end to end: find blocks, score, choose, remove from a copy, check.

The check is a reference that shares no code with the surgery: the traced program run with
every removed residual add replaced by its skip input. A compact model that differs from it
by more than float rounding means the module's forward does something the graph did not show,
and is refused (VerificationError) instead of returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Interpreter, Node
from torch.utils import _pytree as pytree

from graphprune.errors import GraphPruneError, InputError, VerificationError
from graphprune.graph.blocks import Block
from graphprune.graph.blocks import find_blocks as find_module_blocks
from graphprune.graph.copies import eval_copy, keeps_global_rng
from graphprune.graph.inputs import flatten_outputs, normalize_inputs
from graphprune.graph.trace import Traced, check_model, no_cache, trace
from graphprune.planning.depth import SCORES, block_scores, check_depth, check_depth_value, choose
from graphprune.surgery.depth import DepthEntry, remove


class Skipping(Interpreter):
    """Runs the traced program with some residual adds replaced by their skip input."""

    def __init__(self, gm: torch.fx.GraphModule, skip: dict[str, str]) -> None:
        super().__init__(gm, garbage_collect_values=False)  # skip inputs are read late
        self.skip = skip
        self.by_name: dict[str, Node] = {n.name: n for n in gm.graph.nodes}

    def run_node(self, n: Node) -> Any:
        if n.name in self.skip:
            return self.env[self.by_name[self.skip[n.name]]]
        return super().run_node(n)


def reference(traced: Traced, skip: dict[str, str], example_input: Any) -> list[torch.Tensor]:
    """Outputs of the traced program with the adds in ``skip`` (add name -> skip input name) removed."""
    gm = traced.program.module()
    args, kwargs = normalize_inputs(example_input)
    flat = pytree.tree_leaves((tuple(args), kwargs))
    with torch.no_grad():
        out = Skipping(gm, skip).run(*flat)
    return flatten_outputs(out)


def run(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    args, kwargs = normalize_inputs(example_input)
    with torch.no_grad(), no_cache(model):
        return flatten_outputs(model(*args, **kwargs))


@dataclass
class DepthResult:
    """A depth-pruned copy of the model and what was removed (entries replay on a fresh model)."""

    model: nn.Module
    entries: list[DepthEntry]
    notes: list[str]
    blocks: list[Block]  # every block found, removable or not
    scores: dict[int, float]
    ignored: list[nn.Module]  # ignored_layers as modules of ``model`` (for the width cut after)


def _ignored_paths(model: nn.Module, ignored: Any) -> list[str]:
    if ignored is None:
        return []
    items = [ignored] if isinstance(ignored, (str, nn.Module)) else list(ignored)
    names = {id(m): p for p, m in model.named_modules()}
    return [names.get(id(i), "") if isinstance(i, nn.Module) else str(i) for i in items]


def _touches(block: Block, prefixes: list[str]) -> bool:
    names = [block.module, *block.params]
    return any(n == p or n.startswith(p + ".") or p.startswith(n + ".") for p in prefixes for n in names if p)


UNITS = ("module", "branch")


def find(model: nn.Module, example_input: Any, ignored_layers: Any = (), unit: str = "module"
         ) -> tuple[nn.Module, Traced, list[Block]]:
    """(eval copy, its trace, every block found); blocks touching ``ignored_layers`` are refused.

    ``unit="module"``: a block is the module performing residual adds (a whole decoder layer);
    ``"branch"``: each residual branch alone (an attention or MLP sub-layer).
    """
    check_model(model)
    if unit not in UNITS:
        raise InputError(f"depth_unit must be one of {UNITS}, got {unit!r}")
    work = eval_copy(model)
    traced = trace(work, example_input)
    if unit == "branch":
        from graphprune.graph.branches import find_branches

        blocks = find_branches(traced, work, example_input)
    else:
        blocks = find_module_blocks(traced, work, example_input)
    prefixes = _ignored_paths(model, ignored_layers)
    for b in blocks:
        if b.removable and _touches(b, prefixes):
            b.reason = "in ignored_layers"
    return work, traced, blocks


def prune_depth(
    model: nn.Module,
    example_input: Any,
    depth: float | int,
    *,
    importance: str | None = None,
    data: Any = None,
    ignored_layers: Any = (),
    verify: bool = True,
    unit: str = "module",
) -> DepthResult:
    """Remove ``depth`` of the removable blocks (a fraction, rounded, or a count) from a copy.

    With ``verify`` the result must reproduce the reference (module docstring) on
    ``example_input``; a mismatch raises VerificationError naming the blocks.
    """
    if importance is not None and importance not in SCORES:
        raise InputError(f"depth_importance must be one of {SCORES} or None, got {importance!r}")
    check_depth_value(depth)
    work, traced, blocks = find(model, example_input, ignored_layers, unit)
    ignored = [work.get_submodule(p) for p in _ignored_paths(model, ignored_layers) if p]
    n = check_depth(depth, sum(b.removable for b in blocks))
    scores = block_scores(blocks, work, importance, data) if n else {}
    chosen = choose(blocks, scores, n)
    if not chosen:
        return DepthResult(work, [], [], blocks, scores, ignored)
    skip = {a: s for b in chosen for a, s in zip(b.adds, b.skips, strict=True)}
    ref = reference(traced, skip, example_input) if verify else None
    sizes = {k: v.numel() for k, v in work.named_parameters()}
    entries = [DepthEntry(b.module, type(work.get_submodule(b.module)).__name__, b.container, b.position,
                          list(b.tail), scores[b.index], sum(sizes.get(p, 0) for p in b.params),
                          b.zero, list(b.skipped))
               for b in chosen]
    notes = remove(work, entries)
    notes.insert(0, f"removed {len(entries)} of {sum(b.removable for b in blocks)} removable blocks: "
                    + ", ".join(e.module for e in entries))
    if ref is not None:
        try:
            got = run(work, example_input)
        except Exception as exc:  # noqa: BLE001 - the user's forward refuses the shallower model
            raise GraphPruneError(
                f"{type(work).__name__} no longer runs after removing {[e.module for e in entries]} "
                f"({type(exc).__name__}: {str(exc).strip()[:160]}): its forward depends on those modules "
                "in a way the graph does not show (e.g. indexing layers by a count). Keep them with "
                "ignored_layers=[...]") from exc
        _check(ref, got, entries)
    return DepthResult(work, entries, notes, blocks, scores, [m for m in ignored if _inside(work, m)])


def _check(ref: list[torch.Tensor], got: list[torch.Tensor], entries: list[DepthEntry]) -> None:
    worst = 0.0
    ok = len(ref) == len(got)
    for a, b in zip(ref, got, strict=False):
        if a.shape != b.shape:
            ok = False
            break
        err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        worst = max(worst, err / (1 + scale))
    if not ok or worst > 1e-5:
        raise VerificationError(
            f"removing blocks {[e.module for e in entries]} does not reproduce the traced program with "
            f"their residual branches skipped (relative error {worst:.2e}): the module's forward does "
            "something the graph did not show. Pass ignored_layers=[...] for these blocks, and please "
            "report the model.")


def _inside(model: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in model.modules())


@keeps_global_rng
def find_blocks(model: nn.Module, example_input: Any, ignored_layers: Any = (), unit: str = "module"
                   ) -> list[Block]:
    """Every block with a residual add, removable or not (``Block.reason`` says why not).

    Public as ``graphprune.find_blocks``; the model is traced on a copy and never modified.
    """
    return find(model, example_input, ignored_layers, unit)[2]
