"""The fallback's first answer: rewrite the failing submodules as graphs, where that is exact.

When the compact model of the user's class fails (``fallback.find_failure``), the module at
fault is the innermost one on the failure stack whose own code holds a size that changed (a
constant of the whole program, inside that module, that ``graph_constant_changes`` rewrote):
an ``nn.Conv2d`` fed the wrong width is not at fault, the cross-stage-partial stage that split
its input with a stale width is. Every instance of that class holding such a change is rewritten
(``surgery.rewrite``), and the model run again, for a few rounds. The rewrite is kept only if
the model then runs, gives the example's rows again at a larger batch, and passes ``check`` (the
engine's verification against the masked reference); otherwise every replaced module is put
back and the caller keeps the modules whole as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphprune.graph.inputs import flatten_outputs, forward, normalize_inputs
from graphprune.graph.trace import no_cache
from graphprune.surgery.fallback import (
    MAX_ROUNDS,
    Failure,
    batch_of,
    culprit,
    find_failure,
    grown_input,
    merge_args,
    restored_copy,
    same_class,
)
from graphprune.surgery.rewrite import (
    Declined,
    Exports,
    Outcome,
    capture,
    changed_constants,
    install,
    region,
    rewrite,
)


def _changed_paths(graph: torch.fx.Graph, changes: dict) -> set[str]:
    """Every module path (and its ancestors') holding a changed constant of the whole program."""
    paths: set[str] = set()
    for node in changes:
        for fqn, _cls in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(fqn)
    return paths


def _outputs(model: nn.Module, inputs: tuple[tuple, dict]) -> list[torch.Tensor]:
    with torch.no_grad(), no_cache(model):
        return flatten_outputs(forward(model, *inputs))


def _same_rows(model: nn.Module, example_input: Any, batch: int | None) -> str | None:
    """None if the model gives, at one more sample, the example's rows plus one; else why not."""
    if batch is None:
        return None
    try:
        small = _outputs(model, normalize_inputs(example_input))
        big = _outputs(model, grown_input(example_input, batch, 1))
    except Exception as exc:  # noqa: BLE001
        return f"it fails at batch {batch + 1} ({type(exc).__name__})"
    for a, b in zip(small, big, strict=True):
        if b.shape[:1] != (batch + 1,) or not torch.allclose(b[:batch], a, rtol=1e-4, atol=1e-5):
            return f"it gives other rows at batch {batch + 1}"
    return None


def try_rewrite(
    analysis: Any,
    plan: Any,
    changes: dict,
    work: nn.Module,
    example_input: Any,
    failure: Failure,
    check: Callable[[nn.Module], str | None],
) -> Outcome | str:
    """Rewrite the failing submodules of ``work`` in place: the Outcome, or why not (then
    ``work`` is as it was)."""
    batch = batch_of(example_input)
    if batch is None:
        return "the example input has no batch dimension to keep dynamic"
    grown = normalize_inputs(example_input) if batch >= 2 else grown_input(example_input, batch, 2 - batch)
    big = max(batch, 2)
    graph = analysis.traced.program.graph
    changed = _changed_paths(graph, changes)
    expected = analysis.traced.output_shapes
    src = restored_copy(work, plan).eval()
    exports, outcome, replaced = Exports(), Outcome(), []
    tried: set[type] = set()
    why = ""
    try:
        for _ in range(MAX_ROUNDS):
            # the innermost user module on the failure stack that holds a changed size
            path = culprit(work, [p for p in failure.stack if p in changed], tried)
            if path is None:
                why = f"no submodule holding a changed size fails ({failure.problem})"
                break
            cls = type(work.get_submodule(path))
            tried.add(cls)
            paths = [p for p in same_class(work, cls) if p in changed]
            specs = capture(src, paths, grown, big)
            for p in paths:
                if p not in specs:
                    raise Declined(f"{p!r} is not called exactly once with tensors and plain values")
                nodes = region(graph, p)
                def records_of(base: torch.fx.GraphModule, nodes: list = nodes) -> list[dict[str, Any]]:
                    return changed_constants(base, nodes, changes, merge_args)

                record, old = rewrite(work, src, p, specs[p], exports, records_of)
                replaced.append((p, old))
                outcome.records.append(record)
                outcome.classes.setdefault(cls.__name__, []).append(p)
            failure = find_failure(work, example_input, expected)
            if failure is None:
                break
        else:
            why = f"still failing after {MAX_ROUNDS} rounds ({failure.problem})"
        if failure is not None:
            raise Declined(why)
        bad = _same_rows(work, example_input, batch) or check(work)
        if bad:
            raise Declined(bad)
    except Exception as exc:  # noqa: BLE001 - Declined, or anything unforeseen: keep them whole
        if not isinstance(exc, Declined):
            exc = Declined(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        for p, old in reversed(replaced):  # the user's modules back, bound to the same tensors
            install(work, p, old)
        return str(exc)
    return outcome

