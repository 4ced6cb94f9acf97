"""Where to cut: how many units each group loses, and which ones.

``plan.build_plan`` asks this module for the removed units of every group. The policies:

* **local** (default): every prunable group loses ``round(ratio * units)`` of its units;
* **per-module ratios** (``ratios={"layer1": 0.5, 7: 0.2}``): a group whose *output side* (the
  module producing its channels: a Conv/Linear weight's output dim, a bias, a norm layer) lies
  under a given module path - or whose index is given - uses that ratio instead; the longest
  matching path wins;
* **global** (``global_pruning=True``): the units of all groups (except those with an explicit
  ratio) are ranked together and the ``ratio`` share of all of them with the lowest scores goes,
  with at most ``max_ratio`` of any one group so that no group collapses. Scores must then be
  comparable across groups: use a normalised criterion (``"lamp"``) or one in loss units
  (``"taylor"``, ``"hessian"``);
* ``round_to=N``: the kept width of each group becomes a multiple of ``N`` where the group is
  large enough. A unit may span several positions (a head spans ``head_dim`` features), so the
  kept *unit count* is rounded to a multiple of ``N / gcd(N, positions per unit)``: 4 heads of
  64 features already make a width that is a multiple of 8.
* ``round_to="auto"`` (the default of ``compact``): the alignment is chosen per group from what
  the group's layers run well in onnxruntime on CPU (measured by ``tools/width_speed.py``):
  groups with convolution channels get multiples of 16 (MLAS's NCHWc block; a depthwise
  convolution at a width that is not a multiple of 4 ran 2-5x slower per FLOP), narrower groups
  8 or 4 so that one step stays at most half the width; groups of Linear/MatMul features only
  are cut exactly (no width effect was measured), except widths in a stacked weight (per-expert
  weights of a mixture of experts: multiples of 16 bytes, which grouped matrix-product kernels
  require). The kept width is the aligned one nearest to
  ``units * (1 - ratio)`` (ties keep more), so a group never loses more than half a step beyond
  what the ratio asks. ``round_to=1`` cuts every group exactly. See docs/speed.md.

Every group keeps at least one unit, and a group that would lose nothing is left untouched
(rounding never removes units from a group that the ratio spared). Groups whose widths one
integer attribute of the user's module holds (``planning.equal_counts``) then keep one count,
the largest of the set, so the user's forward still fits them all; exact ``counts`` are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.analysis import Analysis, Group
from graphprune.graph.lookup import submodule
from graphprune.planning.equal_counts import equal_count_sets, equalize
from graphprune.planning.options import AUTO, CutOptions

# Alignments tried for groups with convolution channels, widest first (tools/width_speed.py):
# 16 is MLAS's NCHWc block with AVX-512 (8 with AVX2, so 16 suits both); a depthwise conv falls
# off its fast kernel below a multiple of 4.
CONV_ALIGNMENTS = (16, 8, 4)
# An alignment is used only when the group is at least this many steps wide, so that rounding to
# the nearest aligned width moves a group's ratio by at most 1 / (2 * MIN_STEPS) of its width.
MIN_STEPS = 2


def output_modules(group: Group, model: nn.Module) -> list[str]:
    """Module paths producing the group's channels (all member modules if none is recognisable)."""
    out: list[str] = []
    every: list[str] = []
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        every.append(path)
        try:
            mod = submodule(model, path)
        except AttributeError:
            continue
        if produces(mod, attr, m.dim):
            out.append(path)
    return sorted(set(out or every))


def produces(mod: nn.Module, attr: str, dim: int) -> bool:
    """Whether dim ``dim`` of ``mod.<attr>`` is on the output side (the module writes those channels).

    A conv's output-channel dim, a Linear's rows, an Embedding's columns, a bias, a norm layer's
    affine parameters; everything else (input columns, tensors of unknown modules) is not.
    """
    if attr == "bias":
        return dim == 0
    if attr != "weight":
        return False
    if isinstance(mod, nn.modules.conv._ConvNd):
        return dim == (1 if mod.transposed else 0)
    if isinstance(mod, (nn.Linear, nn.Bilinear)):
        return dim == 0
    if isinstance(mod, nn.Embedding):
        return dim == 1
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
    return isinstance(mod, norms) and dim == 0


def _positions_per_unit(group: Group) -> int:
    g = 0
    for m in group.members:
        u = m.unit_of[m.unit_of >= 0]
        if u.size:  # the gcd of the positions per unit (units without any count as 0: neutral)
            g = math.gcd(g, int(np.gcd.reduce(np.bincount(u, minlength=group.num_units))))
    return max(g, 1)


def round_keep(group: Group, n_keep: int, round_to: int | None) -> int:
    """Round a kept unit count so the kept width is a multiple of ``round_to`` (if possible).

    ``round_to`` is an int here; resolve ``"auto"`` per group with :func:`alignment` first.
    """
    units = group.num_units
    if not round_to or round_to <= 1 or n_keep >= units:
        return n_keep
    step = round_to // math.gcd(round_to, _positions_per_unit(group))
    if units < step or step <= 1:
        return n_keep
    kept = int(round(n_keep / step)) * step
    return min(max(kept, step), (units // step) * step)


def _owners(group: Group, model: nn.Module) -> Iterator[tuple[Any, nn.Module, str]]:
    """(member, the module holding its tensor, the tensor's attribute name) for each member."""
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        try:
            mod = submodule(model, path)
        except AttributeError:
            continue
        yield m, mod, attr


def _conv_width(group: Group, model: nn.Module) -> int:
    """Channels the group spans in a convolution weight (0: no convolution among its members)."""
    width = 0
    for m, mod, attr in _owners(group, model):
        if attr == "weight" and isinstance(mod, nn.modules.conv._ConvNd) and m.dim in (0, 1):
            width = max(width, int((m.unit_of >= 0).sum()))
    return width


def _stack_alignment(group: Group, model: nn.Module) -> int:
    """Elements per 16 bytes when the group spans a non-stack dim of a stacked weight (a parameter
    of three or more dims, more than one along the first, outside a convolution: per-expert
    weights picked by a router; a ``(1, tokens, C)`` position embedding is no stack), else 1.
    Grouped matrix-product kernels that run such stacks (torch's ``_grouped_mm`` on CPU) require
    16-byte strides: a width of 90 floats runs in the pruned model's own forward through another
    path, and fails once the model is reloaded with the library's default path."""
    for m, mod, attr in _owners(group, model):
        p = getattr(mod, attr, None)
        if (getattr(p, "ndim", 0) >= 3 and p.shape[0] > 1 and m.dim >= 1 and p.dtype.is_floating_point
                and not isinstance(mod, nn.modules.conv._ConvNd)):
            return max(1, 16 // p.element_size())
    return 1


def alignment(group: Group, model: nn.Module, round_to: int | str | None) -> int:
    """The width multiple ``group`` is rounded to: ``round_to`` itself, or for ``"auto"`` the widest
    of :data:`CONV_ALIGNMENTS` the group is :data:`MIN_STEPS` steps wide for when it has
    convolution channels, 16 bytes for widths in a stacked weight (``_stack_alignment``), else 1
    (exact)."""
    if round_to != AUTO:
        return int(round_to or 1)
    width = _conv_width(group, model)
    conv = next((a for a in CONV_ALIGNMENTS if width >= MIN_STEPS * a), 1)
    return max(conv, _stack_alignment(group, model))


def aligned_keep(group: Group, target_keep: float, align: int) -> int:
    """The kept unit count whose width is the multiple of ``align`` nearest to ``target_keep`` units.

    The candidates are the aligned counts from one step up to the group's size, plus the group's
    own size (leaving a group whole never makes it slower than the original). Ties keep more
    units. Where no aligned count below the group's size exists, ``target_keep`` is rounded
    exactly. Nearest rounding keeps at least ``target_keep - step / 2`` units: never a whole step
    beyond what was asked.
    """
    units = group.num_units
    exact = min(units, max(1, int(math.floor(target_keep + 0.5))))
    if align <= 1 or exact >= units:
        return exact
    step = align // math.gcd(align, _positions_per_unit(group))
    if step <= 1 or units <= step:
        return exact
    options = [*range(step, units, step), units]
    return min(options, key=lambda k: (abs(k - target_keep), -k))


def key_matches(key: str | int, group: Group, owners: list[str]) -> bool:
    if isinstance(key, int):
        return key == group.index
    return any(o == key or o.startswith(key + ".") for o in owners)


def ratio_of(group: Group, owners: list[str], ratios: Mapping[str | int, float]) -> float | None:
    """An int key naming the group wins; otherwise the longest matching module path."""
    if group.index in ratios:
        return float(ratios[group.index])
    hits = [
        (len(k), float(r)) for k, r in ratios.items() if isinstance(k, str) and key_matches(k, group, owners)
    ]
    return max(hits)[1] if hits else None


def global_counts(scores: Mapping[int, np.ndarray], target: int, caps: Mapping[int, int]) -> dict[int, int]:
    """How many units each group loses when the ``target`` lowest-scored units of all go.

    Greedy over the units sorted by score (ties broken by group then unit index, so the result
    is deterministic): a unit is taken unless its group already lost ``caps[group]`` units.
    """
    entries = sorted((float(v), gi, u) for gi, arr in scores.items() for u, v in enumerate(arr))
    taken = dict.fromkeys(scores, 0)
    n = 0
    for _v, gi, _u in entries:
        if n >= target:
            break
        if taken[gi] < caps.get(gi, 0):
            taken[gi] += 1
            n += 1
    return taken


def choose_removed(
    analysis: Analysis,
    ratio: float,
    criterion: Callable[[Group, nn.Module], Any],
    opts: CutOptions,
    scores_for: Callable[[Any, Group, nn.Module], np.ndarray],
) -> tuple[dict[int, list[int]], list[str]]:
    """Removed unit indices per group index, plus notes for the plan."""
    model = analysis.model
    notes: list[str] = []
    groups = [g for g in analysis.groups if g.members and g.num_units > 1]
    counts: dict[int, int] = {}  # group index -> units to remove (before rounding)
    pool: list[Group] = []
    matched: set[str | int] = set()
    ratios = opts.ratios or {}
    exact: set[int] = set()
    wanted: dict[int, float] = {}  # group index -> kept units asked for (before rounding)
    for g in groups:
        if opts.counts is not None and g.index in opts.counts:
            counts[g.index] = max(0, min(int(opts.counts[g.index]), g.num_units - 1))
            exact.add(g.index)
            continue
        r = None
        if ratios:
            owners = output_modules(g, model)
            r = ratio_of(g, owners, ratios)
            if r is not None:
                matched.update(k for k in ratios if key_matches(k, g, owners))
        if r is None and opts.global_pruning:
            pool.append(g)
            continue
        r = ratio if r is None else r
        counts[g.index] = min(int(round(r * g.num_units)), g.num_units - 1)
        wanted[g.index] = g.num_units * (1.0 - r)
    unknown = [k for k in ratios if k not in matched]
    if unknown:
        names = sorted({o for g in groups for o in output_modules(g, model)})
        raise InputError(
            f"ratios keys {unknown} match no prunable group. Keys are module paths (a prefix such as "
            f"'layer1' matches every group produced under it) or group indices; prunable groups are "
            f"produced by: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
    cache: dict[int, np.ndarray] = {}

    def scores(g: Group) -> np.ndarray:
        if g.index not in cache:
            cache[g.index] = scores_for(criterion, g, model)
        return cache[g.index]

    if pool:
        max_ratio = opts.cap
        total = sum(g.num_units for g in pool)
        target = int(round(ratio * total))
        caps = {g.index: min(g.num_units - 1, int(math.floor(max_ratio * g.num_units))) for g in pool}
        taken = global_counts({g.index: scores(g) for g in pool}, target, caps)
        n = sum(taken.values())
        counts.update(taken)
        notes.append(
            f"global pruning over {len(pool)} groups: {n} of {total} units removed "
            f"(target {target}, at most {max_ratio:g} of any group)"
        )
        if n < target:
            notes.append(
                f"global pruning removed only {n} of the {target} units asked for: every group hit its "
                "max_ratio cap (raise max_ratio to remove more)"
            )
    by_index = {g.index: g for g in groups}
    removed: dict[int, list[int]] = {}
    aligned: dict[int, int] = {}  # alignment -> groups rounded to it (for the plan's notes)
    keep: dict[int, int] = {}
    for gi, n_remove in counts.items():
        g = by_index[gi]
        if n_remove <= 0:
            continue
        n_keep = g.num_units - n_remove
        if gi not in exact and opts.round_to == AUTO:
            align = alignment(g, model, AUTO)
            n_keep = aligned_keep(g, wanted.get(gi, float(n_keep)), align)
            if align > 1:
                aligned[align] = aligned.get(align, 0) + 1
        elif gi not in exact:
            n_keep = round_keep(g, n_keep, opts.round_to)
        keep[gi] = n_keep
    # groups whose widths one attribute describes (a head's key_dim...) keep one count
    keep, tied = equalize(keep, {g.index: g.num_units for g in groups}, equal_count_sets(analysis), exact)
    if tied:
        notes.append(f"equal counts: {tied} set(s) of groups whose widths one module attribute holds "
                     "(a split by self.val_dim in every head...) keep the largest count of the set")
    for gi, n_keep in keep.items():
        g = by_index[gi]
        n_remove = g.num_units - n_keep
        if n_remove <= 0:
            continue
        order = np.argsort(scores(g), kind="stable")
        removed[gi] = sorted(int(u) for u in order[:n_remove])
    if aligned:
        by = ", ".join(f"{n} to multiples of {a}" for a, n in sorted(aligned.items(), reverse=True))
        notes.append(
            f"round_to='auto': kept widths of groups with convolution channels aligned ({by}) for "
            "onnxruntime's CPU kernels; round_to=1 cuts exactly"
        )
    if pool and opts.round_to and opts.round_to != 1:
        after = sum(len(removed.get(g.index, [])) for g in pool)
        notes.append(f"round_to={opts.round_to}: {after} units of the global pool removed after rounding")
    return removed, notes
