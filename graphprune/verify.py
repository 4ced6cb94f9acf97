"""Checks run by ``compact(verify=True)``: the compact model against an independent reference.

A compact model that runs and has the right output shapes can still be numerically wrong (a
slice in the wrong order, an attribute left at its old value, a rule that mis-described an op).
So besides the shapes, ``compact`` compares the compact model's outputs with a *reference*
computed from nothing but the plan and the original model:

    the original traced program, run on the original weights, with every position the plan
    removes set to zero -- in every parameter and right after every op.

Why that equals removal. The compact model is the original with the removed positions gone;
the reference keeps them but holds them at zero, so every op sees, at the kept positions, the
same numbers in both. (Convolutions and linear layers run on the channels both their input
and weight keep, scattered back to full width: the same sums without the terms that are zero,
``reference/gathered.py``.) Case by case:

1. Channel-separable ops (conv, linear, matmul/einsum contractions, elementwise ops, pooling,
   BatchNorm, GroupNorm with whole groups, attention with whole heads): a zero input channel
   contributes nothing to a contraction, and every other output position depends only on kept
   positions. Re-zeroing after the op matters: a BatchNorm shift or a bias makes a removed
   channel non-zero, and the next op must not see that (removal means it does not exist).
2. In-place ops mutate their argument: the mutated argument is re-zeroed too, so later readers
   of it agree with the compact model.
3. Statistics over pruned channels the user allowed with ``prune_hidden=True`` (LayerNorm/RMSNorm
   over the hidden size, mean/var/max/norm over channels -- the soft-frozen positions): zeros
   *would* change the statistic, so the reference computes these ops on the kept positions
   only (gathered), then scatters the result back. This is exact whenever the kept positions
   form a rectangle along the reduced dims, which is what the planner produces. Positions the
   analysis never allowed to be pruned through a statistic (softmax over channels, or a
   statistic whose rule forgot to soft-freeze) are *not* gathered: their zeros change the
   result, and the mismatch exposes the bug.
4. Where no exact reference exists (a reduction over a pattern that is not a rectangle, a model
   on the ``meta`` device, graphs with effect tokens) the numeric check is skipped and the
   report says why; the shape check always runs.

The reference is independent of surgery (it never looks at the sliced tensors, the attribute
updates or the user's code at the new sizes) and of the planner's bookkeeping (the removed
positions are re-derived from ``plan.slices``). It costs one extra forward pass, its products
at the kept width.

Tolerance. Removal changes summation orders, so compact and reference agree only to about the
model's own float32 rounding error. Small float32 models (``TIGHT_MAX_PARAMS``) are held to 10x
that error (at least ``TIGHT_FLOOR``), measured by running them once in float64, which is only
done when an output differs by more than ``TIGHT_FLOOR`` (``LazyTight``); larger ones to
``DEFAULT_RTOL``, with the same float64 measurement as a second chance before a mismatch is
reported (``reference/tolerance.py``).

On a mismatch the error names the first layer whose output differs and the pruned groups that
touch it: hooks on the compact model are compared with the reference's intermediate values.

Models made of repeated residual blocks (decoder layers in a ``ModuleList``) are compared block
by block (``reference/blockwise.py``): each compact block runs on the reference's own input to
it, so the first block that diverges is named, and a block's rounding allowance is measured on
a float64 copy of that block alone. The model's outputs are still compared after that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import VerificationError
from graphprune.graph.analysis import Analysis
from graphprune.graph.codepath import code_path_change
from graphprune.graph.copies import eval_copy, keeps_global_rng
from graphprune.planning.plan import Plan
from graphprune.reference.blockwise import (
    Piece,
    block_spans,
    copy_values,
    describe_piece,
    record_blocks,
    run_blockwise,
)
from graphprune.reference.masks import (
    Inexact,
    describe_classes,
    groups_of_classes,
    reference_masks,
    removed_classes,
)
from graphprune.reference.run import compute_reference, first_mismatch, on_meta, run_reference, small_outputs
from graphprune.reference.tolerance import LazyTight, relative_error, tolerance


@dataclass
class VerifyReport:
    """What the verification compared: per-output relative errors, or why numerics were skipped."""

    errors: list[float] = field(default_factory=list)
    tolerances: list[float] = field(default_factory=list)
    skipped: str | None = None  # reason the numeric comparison did not run
    blocks: list[Piece] = field(default_factory=list)  # block by block (reference/blockwise.py)
    notes: list[str] = field(default_factory=list)  # e.g. a difference explained by rounding

    @property
    def exact(self) -> bool:
        return self.skipped is None


# ------------------------------------------------------------------------------------------
# Comparing
# ------------------------------------------------------------------------------------------


def verify_compact(
    analysis: Analysis,
    plan: Plan,
    small: nn.Module,
    example_input: Any,
    original: nn.Module | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Check ``small`` against the plan's reference; raise ``VerificationError`` on a mismatch.

    ``analysis`` is the analysis the plan was made from, ``original`` the user's (unmodified)
    model whose weights the reference uses. A reference surgery computed for the same removed
    units (``plan._reference``, before slicing) is reused instead of running the masked program
    again; it is the only one when the original weights are gone (``compact(inplace=True)``).
    Without ``original`` or such a reference only shapes are checked.
    """
    # The compact model runs once: block by block when the reference has block values (that
    # run's outputs are also what the shapes are checked on), else plainly; before, a plain run
    # for the shapes always came first and the block-wise run second (0.5 s of a 1.1 B LLaMA).
    expected_shapes = analysis.traced.output_shapes
    report = VerifyReport()
    cached = getattr(plan, "_reference", None)
    if original is None and cached is None:
        _check_shapes(_run(small, example_input), expected_shapes)
        report.skipped = "no original model given"
        return report
    if (original is not None and on_meta(original)) or on_meta(small):
        _check_shapes(_run(small, example_input), expected_shapes)
        report.skipped = "the model is on the meta device (no values to compare)"
        return report
    removed = removed_classes(analysis, plan)
    frozen_removed = np.flatnonzero(removed & analysis.frozen_class)
    if frozen_removed.size:
        _check_shapes(_run(small, example_input), expected_shapes)  # a model that cannot run says so first
        reasons = sorted({analysis.frozen_reasons.get(int(c), "frozen") for c in frozen_removed})
        raise VerificationError(
            f"the plan removes units the analysis keeps whole ({'; '.join(reasons[:3])}): "
            f"{describe_classes(analysis, frozen_removed)}. Was the plan made with prune_hidden=True? "
            "Then verify with the same setting."
        )
    reuse = cached is not None and np.array_equal(cached[0], removed)
    if not reuse and original is None:
        _check_shapes(_run(small, example_input), expected_shapes)
        report.skipped = "no original model given, and surgery's reference is for other units"
        return report
    spans = [] if reuse else block_spans(analysis)  # repeated blocks: checked one by one
    values = None
    try:
        if reuse:
            ref, values = cached[1].outputs, copy_values(cached[1].blocks)
        elif spans:
            ref, values = record_blocks(analysis, removed, original, example_input, spans)
        else:
            ref, _ = run_reference(analysis, reference_masks(analysis, removed), original, example_input)
    except Inexact as why:
        _check_shapes(_run(small, example_input), expected_shapes)
        report.skipped = f"no exact reference: {why}"
        return report
    # Small float32 models are held to their own rounding error (measured against float64), not
    # to the blanket 1e-4: random-weight attention is so uniform that regrouped heads moved Phi's
    # outputs by only 4e-5 (a real bug, which the blanket tolerance let through).
    # (measured lazily: an error within TIGHT_FLOOR passes whatever the float64 run would say)
    lazy = LazyTight(original, example_input) if rtol is None and not reuse else None
    # the model's own rounding error, measured at most once for every failing check below
    noise_of = (lazy or LazyTight(original, example_input)).amplification if original is not None else None
    reused = cached[1].rtol if rtol is None and reuse else None

    def tol_of(e: torch.Tensor, err: float) -> float:
        """The tolerance one reference tensor ``e`` holds an error ``err`` to."""
        tight = lazy.tolerance(err) if lazy is not None and e.dtype == torch.float32 else reused
        return tight if tight is not None and e.dtype == torch.float32 else tolerance(e, rtol)

    blockwise = None
    if values and values.spans:
        blockwise = _run(small, example_input, lambda: run_blockwise(small, example_input, values, tol_of))
    got = blockwise[0] if blockwise is not None else _run(small, example_input)
    _check_shapes(got, expected_shapes)
    if any(t.is_meta for t in got):
        report.skipped = "the model is on the meta device (no values to compare)"
        return report
    if len(ref) != len(got):
        raise VerificationError(f"the compact model returns {len(got)} tensors, the reference {len(ref)}")
    if blockwise is not None:  # outputs of the run that fed every block the reference's input
        report.blocks = blockwise[1]
        _check_pieces(analysis, removed, small, report, noise_of)
    bad = []
    for i, (g, e) in enumerate(zip(got, ref)):
        err = relative_error(g, e.to(g.device)) if g.dtype == e.dtype else math.inf
        tol = tol_of(e, err)
        report.errors.append(err)
        report.tolerances.append(tol)
        if not err <= tol:
            bad.append((i, err, tol, g.dtype, e.dtype))
    if bad and original is None:
        raise VerificationError(
            "the compact model does not match the reference computed from the plan ("
            + ", ".join(f"output {i}: relative error {err:.3g} > {tol:g}" for i, err, tol, _, _ in bad)
            + "). This is a graphprune bug: please report it with the model; the original weights are "
            "gone (inplace=True), so rebuild the model and compact it without inplace=True to see "
            "which layer differs."
        )
    if bad:
        noise = noise_of() if noise_of is not None else None
        if noise is not None and all(err <= max(tol, 10 * noise) for _, err, tol, _, _ in bad):
            # The model itself turns float32 rounding into errors this large (random-weight
            # models with extreme BatchNorm statistics do): a different summation order in the
            # smaller layers explains the difference, not a wrong plan.
            report.notes.append(
                f"outputs differ by up to {max(e for _, e, _, _, _ in bad):.3g} (relative), within 10x "
                f"of the model's own float32 rounding error {noise:.3g} (measured against float64)"
            )
            return report
        where = _localize(analysis, removed, original, small, example_input, rtol)
        details = ", ".join(
            f"output {i}: relative error {err:.3g} > {tol:g}" + (f" (dtype {gd} vs {ed})" if gd != ed else "")
            for i, err, tol, gd, ed in bad
        )
        changed = code_path_change(analysis.traced.program, small, example_input)
        if changed is not None:  # the user's code branches on a size: not a pruning rule's fault
            raise VerificationError(
                f"the compact model does not match the reference computed from the plan ({details}). "
                f"{where} {changed}".replace("  ", " ")
            )
        if plan.structure.get("attention") == "head_dim":
            hint = (
                " With attention='head_dim' a scale recomputed from the head size in forward "
                "(`scores / self.head_dim ** 0.5`) changes with it: compute the scale in __init__ "
                "(or pass scale= to scaled_dot_product_attention), or use attention='heads'. "
                "Otherwise this is a graphprune bug: please report it with the model. Meanwhile pass "
            )
        else:
            hint = " This is a graphprune bug: please report it with the model. Meanwhile pass "
        raise VerificationError(
            f"the compact model does not match the reference computed from the plan ({details}). "
            f"{where}{hint}the named layers in ignored_layers=[...] to leave them unpruned."
        )
    return report


def _run(small: nn.Module, example_input: Any, how: Callable[[], Any] | None = None) -> Any:
    """Run the compact model (plainly, or ``how()``); a model that fails to run is a VerificationError."""
    try:
        return small_outputs(small, example_input) if how is None else how()
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(
            f"the compact model does not run on the example input ({type(exc).__name__}: {exc})"
        ) from exc


def _check_shapes(got: list[torch.Tensor], expected: list[tuple[int, ...]]) -> None:
    shapes = [tuple(t.shape) for t in got]
    if shapes != expected:
        raise VerificationError(f"compact model output shapes {shapes} differ from the original {expected}")


# ------------------------------------------------------------------------------------------
# Localising a mismatch
# ------------------------------------------------------------------------------------------


def _check_pieces(analysis: Analysis, removed: np.ndarray, small: nn.Module, report: VerifyReport,
                  noise_of: Callable[[], float | None] | None) -> None:
    """Raise naming the first block (or the part between blocks) that differs from the reference.

    ``noise_of()`` is the whole model's rounding amplification (None without the original)."""
    bad = [p for p in report.blocks if not p.ok]
    if not bad:
        return
    # as for whole-model outputs (verify_compact): differences explained by rounding are not a
    # wrong plan. A block is measured alone (a float64 copy of that block: blockwise.block_noise);
    # the stream entering the next block carries that block's difference, so it inherits its
    # measure; a difference arising before the first block or between blocks is measured on the
    # whole model, as before (only then: it copies the model to float64)
    carried: float | None = None
    first = None
    for p in report.blocks:
        if p.label == p.path:
            carried = p.noise if not p.ok else None
        if p.ok:
            continue
        noise = p.noise if p.label == p.path else carried
        if noise is None and p.label != p.path and noise_of is not None:
            noise = noise_of()
        if noise is None or p.error > max(p.tol, 10 * noise):
            first = p
            break
    if first is None:
        worst = max(bad, key=lambda p: p.error)
        report.notes.append(
            f"blocks differ by up to {worst.error:.3g} (relative), within 10x of their own float32 "
            "rounding error (measured against float64)"
        )
        return
    checked = sum(1 for p in report.blocks[: report.blocks.index(first)] if p.label == p.path)
    pruned = groups_of_classes(analysis, np.flatnonzero(removed))
    there = _groups_under(analysis, pruned, first.path) or pruned
    groups = "; ".join(f"group {g} ({analysis.groups[g].describe()})" for g in there[:6])
    raise VerificationError(
        f"the compact model does not match the reference computed from the plan, checked block by "
        f"block: {describe_piece(first, small, checked)}. Groups pruned there: {groups}. This is a "
        f"graphprune bug: please report it with the model. Meanwhile pass ignored_layers=['{first.path}'] "
        "to leave that block unpruned."
    )


def _groups_under(analysis: Analysis, groups: list[int], path: str) -> list[int]:
    return [g for g in groups
            if any(m.name == path or m.name.startswith(path + ".") for m in analysis.groups[g].members)]


def _localize(
    analysis: Analysis,
    removed: np.ndarray,
    original: nn.Module,
    small: nn.Module,
    example_input: Any,
    rtol: float | None,
) -> str:
    """Name the first layer whose output differs from the reference, and its pruned groups."""
    pruned_groups = groups_of_classes(analysis, np.flatnonzero(removed))

    def describe(groups: list[int]) -> str:
        return "; ".join(f"group {g} ({analysis.groups[g].describe()})" for g in groups[:6])

    fallback = f"Pruned groups: {describe(pruned_groups)}." if pruned_groups else ""
    try:
        ref = compute_reference(analysis, removed, original, example_input, per_module=True)
        found = first_mismatch(ref, small, example_input, rtol)
    except Exception:  # noqa: BLE001 - localisation is best effort; the mismatch itself is the error
        return fallback
    if not found or not found[0]:
        return fallback
    path, err = found
    touching = _groups_under(analysis, pruned_groups, path)
    kind = type(small.get_submodule(path)).__name__
    return (
        f"First layer that differs: {path} ({kind}, relative error {err:.3g}); "
        f"groups pruned there: {describe(touching or pruned_groups)}."
    )


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------


@keeps_global_rng
def verify_model(
    original: nn.Module,
    small: nn.Module,
    example_input: Any,
    plan: Plan,
    *,
    prune_hidden: bool | None = None,
    rtol: float | None = None,
) -> VerifyReport:
    """Check that ``small`` is ``original`` with exactly the units of ``plan`` removed.

    Re-analyses ``original`` (never modifying it), derives the removed units from
    ``plan.slices`` and compares ``small``'s outputs with the masked reference (module docstring).
    Raises ``graphprune.VerificationError`` naming the layer and groups on a mismatch; returns a
    ``VerifyReport`` with the relative errors otherwise.
    """
    from graphprune.graph.analysis import analyze

    structure = dict(plan.structure)  # the plan knows how it was grouped; an explicit flag wins
    if prune_hidden is not None:
        structure["prune_hidden"] = prune_hidden
    analysis = analyze(original, example_input, **structure)
    small = eval_copy(small)  # like the reference: inference mode, and the caller's model never runs
    return verify_compact(analysis, plan, small, example_input, original=original, rtol=rtol)
