"""The entry point ``graphprune.api`` calls: plan -> reconstruct -> the plan that matches it.

Kept apart from ``api`` so the pipeline gains one call, not the details: ``prepare_model``
gives layers without a bias a zero one before analysis, ``reconstructed_plan`` runs the
sequential reconstruction on the analysis' model and rebuilds the plan so it removes exactly
the units reconstruction chose, and ``finish`` takes unused biases out of the compact model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import Analysis, Group
from graphprune.planning.cut import CutOptions
from graphprune.planning.plan import Plan, build_plan
from graphprune.reconstruct.biases import strip_unused, with_biases
from graphprune.reconstruct.run import Reconstruction, ReconstructOptions, check_data, reconstruct

__all__ = ["check_request", "defaults", "finish", "plan_for", "prepare_model", "reconstructed_plan"]


def defaults(importance: Any, reconstruct: Any, data: Any) -> tuple[Any, Any]:
    """``importance=None`` / ``reconstruct=None`` (not given) resolved: with calibration ``data`` and
    no criterion named, reconstruct (the best data-driven choice measured, see
    docs/methods/reconstruction.md); otherwise l2 magnitude and no reconstruction."""
    if reconstruct is None:
        reconstruct = data is not None and importance is None
    return ("l2" if importance is None else importance), reconstruct


def check_request(reconstruct: Any, data: Any, example_input: Any) -> ReconstructOptions | None:
    """``reconstruct`` (False/None, True or a ReconstructOptions) as options; checks data first."""
    if reconstruct is None or reconstruct is False:
        return None
    if reconstruct is True:
        opts = ReconstructOptions()
    elif isinstance(reconstruct, ReconstructOptions):
        opts = reconstruct
    else:
        raise InputError(
            f"reconstruct must be True, False or graphprune.ReconstructOptions(...), got {reconstruct!r}"
        )
    if not (isinstance(opts.ridge, (int, float)) and opts.ridge >= 0):
        raise InputError(f"ReconstructOptions.ridge must be a number >= 0, got {opts.ridge!r}")
    if opts.selection not in ("obs", "plan"):
        raise InputError(f"ReconstructOptions.selection must be 'obs' or 'plan', got {opts.selection!r}")
    check_data(data, example_input)
    return opts


def prepare_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model to analyse: a copy in which every Linear/Conv without a bias has a zero one."""
    return with_biases(model)


class _Chosen:
    """A criterion that ranks the units reconstruction chose first (plan rebuilding only)."""

    def __init__(self, chosen: dict[int, list[int]]) -> None:
        self.chosen = chosen

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        scores = np.ones(group.num_units)
        scores[self.chosen.get(group.index, [])] = 0.0
        return scores


def reconstructed_plan(
    analysis: Analysis,
    plan: Plan,
    data: Any,
    options: ReconstructOptions,
    cut: CutOptions | None,
    progress: bool = False,
) -> Plan:
    """Reconstruct ``analysis.model`` in place for ``plan``'s counts; return the plan that removes
    exactly the units chosen (realise it on a copy: the reconstructed full-size model is
    verification's reference)."""
    planned = {g.index: list(g.removed) for g in plan.groups if g.removed}
    rec = reconstruct(analysis, planned, data, options, progress=progress)
    return plan_for(analysis, plan, rec, options, cut)


def plan_for(
    analysis: Analysis, plan: Plan, rec: Reconstruction, options: ReconstructOptions, cut: CutOptions | None
) -> Plan:
    """The plan that removes exactly the units reconstruction ``rec`` chose (``plan``: the one it
    started from; its ratio and notes carry over). Shared by ``compact`` and the block-by-block
    checkpoint path."""
    counts = {g.index: len(rec.chosen.get(g.index, [])) for g in analysis.groups if g.members}
    base = cut or CutOptions()
    new = build_plan(
        analysis,
        plan.ratio,
        _Chosen(rec.chosen),
        plan.importance if options.selection == "plan" else "obs",
        counts=counts,
        options=CutOptions(round_to=None, counts=counts, max_ratio=base.max_ratio),
    )
    for g in new.groups:
        if g.removed and g.removed != rec.chosen.get(g.index, []):  # pragma: no cover - invariant
            raise GraphPruneError(
                f"internal error: group {g.index}'s plan and reconstruction disagree; please report it "
                "with the model, and pass reconstruct=False meanwhile"
            )
    new.notes = [n for n in plan.notes if n not in new.notes] + new.notes
    new.notes.append(
        f"reconstruct: {len(rec.refit)} consumer weights refit by ridge least squares (ridge "
        f"{options.ridge:g}) on the compacted prefix, {rec.passes} calibration passes"
        + ("; BatchNorm statistics re-estimated" if rec.batchnorm else "")
    )
    new.reconstruction = rec  # type: ignore[attr-defined]  # the run's summary, not saved
    return new


def finish(small: nn.Module, plan: Plan, added: list[str]) -> None:
    """Take the zero biases nobody needed out of ``small``; record the rest in the plan."""
    strip_unused(small, plan, added)
