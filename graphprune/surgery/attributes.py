"""Choosing among ambiguous attribute updates by running the model.

When two attributes of one module hold the same old size (GPT-2's Conv1D has ``nx == nf``) or a
graph constant only *may* be a size (``UncertainUpdate``), shapes alone cannot say which ones to
change. The choice is made by trial: apply one option, run the model on the example input, and
compare with the plan's masked reference where one is available.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from graphprune.planning.plan import AttrUpdate
from graphprune.surgery.fallback import Watch, find_failure
from graphprune.surgery.sizes import UncertainUpdate
from graphprune.surgery.slicing import apply_attr_updates


def _failing_modules(model: nn.Module, example_input: Any, expected, reference: Any = None
                     ) -> tuple[list[str] | None, float | None]:
    """Run the model once: ``(None, None)`` if it works (and, with a ``reference``, computes the
    plan's numbers in every layer compared), else the paths of the modules active at the failure
    (``["", layer]``: the first layer whose output differs from the reference) and, when the
    model's outputs matched and only a layer differs, that layer's error."""
    if reference is None:
        failure = find_failure(model, example_input, expected)
        return (None if failure is None else failure.stack), None
    from graphprune.reference.run import compare

    with Watch(model) as watch:  # one run: where it fails, its shapes, and its numbers
        matched, wrong = compare(reference, model, example_input)
    if watch.shapes is None:  # it raised (compare says so without the where)
        return list(watch.stack) or [""], None
    if watch.shapes != list(expected):
        return [""], None
    if wrong is None:
        return None, None
    return ["", wrong[0]], (wrong[1] if matched else None)


def _hashable(value: Any) -> Any:
    """An attribute value as a dict key: a split-size list (``[64, 64, 128]``) as a tuple."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _by_change(ups: list[AttrUpdate]) -> list[list[AttrUpdate]]:
    """The updates grouped by (module, old value, new value): the candidates for one change."""
    sets: dict[tuple[str, Any, Any], list[AttrUpdate]] = {}
    for u in ups:
        sets.setdefault((u.module, _hashable(u.old), _hashable(u.new)), []).append(u)
    return list(sets.values())


def _is_ambiguous(group: list[AttrUpdate]) -> bool:
    return len(group) > 1 or isinstance(group[0], UncertainUpdate)


def _ambiguous_sets(ups: list[AttrUpdate]) -> list[list[AttrUpdate]]:
    return [g for g in _by_change(ups) if _is_ambiguous(g)]


def reference_if_ambiguous(analysis, removed, work, ups, example_input, always: bool = False):
    """The plan's reference (verify.py): per layer when attribute choices need judging, outputs
    only when ``always`` (the weights are about to go: ``inplace``); else None."""
    ambiguous = bool(_ambiguous_sets(ups))
    if not (ambiguous or always) or any(p.is_meta for p in work.parameters()):
        return None  # nothing to choose, or no values to compare (meta: shapes decide)
    from graphprune.reference.blockwise import reference_with_blocks

    try:  # verify reuses it: with the block boundaries, for the block-wise check
        return reference_with_blocks(analysis, removed, work, example_input, per_module=ambiguous)
    except Exception:  # noqa: BLE001 - no reference: choose by shapes as before
        return None


def _subsets(g: list[AttrUpdate], smallest_first: bool) -> list[list[AttrUpdate]]:
    """Every subset of a small ambiguous set (sizes ascending or descending); else the old options."""
    from itertools import combinations

    if len(g) > 4:
        return [[]] + [[u] for u in g] if smallest_first else [list(g)] + [[u] for u in g] + [[]]
    sizes = range(len(g) + 1) if smallest_first else range(len(g), -1, -1)
    return [list(c) for k in sizes for c in combinations(g, k)]


def _per_module(ambiguous: list[list[AttrUpdate]], options: list[list[list[AttrUpdate]]]):
    """Merge the ambiguous sets of one module into one choice over their joint options.

    GQA with 4 q heads of width 4 and 2 kv heads: ``4 -> 2`` (num_heads or head_dim) and
    ``2 -> 1`` (num_kv_heads) must be chosen together; a walk that changes one set at a time
    can miss the only right pair (found by fuzzing). Joint options are ordered by how far they
    are from each set's first option, and capped.
    """
    from itertools import product

    by_module: dict[str, list[int]] = {}
    for k, g in enumerate(ambiguous):
        by_module.setdefault(g[0].module, []).append(k)
    groups, opts = [], []
    for ks in by_module.values():
        combos = sorted(product(*[range(len(options[k])) for k in ks]), key=sum)[:256]
        groups.append([u for k in ks for u in ambiguous[k]])
        opts.append([[u for k, i in zip(ks, c) for u in options[k][i]] for c in combos])
    return groups, opts


def choose_attr_updates(
    work, ups: list[AttrUpdate], example_input, expected, reference: Any = None
) -> tuple[list[AttrUpdate], bool]:
    """Apply the attribute updates found in the graph; resolve ambiguous ones by running the model.

    When two attributes of one module hold the same old value (GPT-2's Conv1D has ``nx == nf``)
    only some of them may be sizes that changed. Starting from "update all", each failure is
    traced to the innermost running module with an ambiguous choice, whose next option is tried:
    linear in the number of choices, not exponential. With a ``reference`` (verify.Reference) a
    trial that runs must also compute the plan's numbers, in its outputs and in every layer the
    reference recorded; otherwise the first layer whose output differs is the failure location.
    A trial whose outputs match while a layer differs is kept: if no trial matches everywhere,
    the one with the smallest such layer error is applied (an ill-conditioned layer's rounding).
    Returns the updates applied and whether the model was run
    with them and gave the ``expected`` output shapes.
    """
    sets = _by_change(ups)
    sure = [u for g in sets if not _is_ambiguous(g) for u in g]
    ambiguous = [g for g in sets if _is_ambiguous(g)]
    apply_attr_updates(work, ups)
    if not ambiguous:
        return ups, False
    # uncertain ones start from "leave it": applied only if the model needs them
    options = [_subsets(g, smallest_first=isinstance(g[0], UncertainUpdate)) for g in ambiguous]
    ambiguous, options = _per_module(ambiguous, options)
    choice = [0] * len(ambiguous)
    revert = [AttrUpdate(u.module, u.attr, u.new, u.old) for u in ups]
    # a trial whose outputs match while one layer differs: kept, the closest wins if none is exact
    best: tuple[float, list[AttrUpdate]] | None = None
    for _ in range(sum(len(o) for o in options) + 1):
        trial = sure + [u for k, g in enumerate(options) for u in g[choice[k]]]
        apply_attr_updates(work, revert)
        apply_attr_updates(work, trial)
        failing, layer_error = _failing_modules(work, example_input, expected, reference)
        if failing is None:
            return trial, True
        if layer_error is not None and (best is None or layer_error < best[0]):
            best = (layer_error, trial)
        candidates = [
            k
            for k, g in enumerate(ambiguous)
            if choice[k] + 1 < len(options[k])
            and any(
                f == g[0].module or f.startswith(g[0].module + ".") or g[0].module.startswith(f)
                for f in failing[-1:]
            )
        ]
        if not candidates:
            candidates = [k for k in range(len(ambiguous)) if choice[k] + 1 < len(options[k])]
        if not candidates:
            break
        k = max(candidates, key=lambda k: len(ambiguous[k][0].module))
        choice[k] += 1
    apply_attr_updates(work, revert)
    if best is not None:  # the outputs matched: the layer's error may be its own rounding
        apply_attr_updates(work, best[1])
        return best[1], True
    apply_attr_updates(work, ups)
    return ups, False
