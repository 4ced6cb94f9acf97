"""Biases for bias compensation: a consumer without one gets one, kept only where it is used.

Removing a unit whose activation has a non-zero mean shifts every consumer's output by
``W_u E[x_u]``; the least-squares refit folds that into the bias (FLAP). A Linear or Conv
without a bias has nowhere to put it, so before analysis every such layer of the working copy
gets a zero bias (the traced program, the plan and the verification then all know about it).
After the refit, biases that stayed exactly zero are taken out again and the plan forgets
them; the others are listed in ``plan.biases`` so that ``apply_plan`` / ``graphprune.load``
add them to a freshly built model before slicing.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.graph.copies import private_copy
from graphprune.planning.plan import Plan
from graphprune.surgery.slicing import zero_bias


def _biasable(mod: nn.Module) -> bool:
    return (
        isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
        and not isinstance(mod, nn.modules.conv._ConvTransposeNd)
        and getattr(mod, "bias", None) is None
    )


def with_biases(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy in which every Linear / Conv1d / Conv2d without a bias has a zero one.

    A full copy, not a weight-sharing one: reconstruction refits the analysed model's weights in
    place, so they must never be the caller's."""
    work = private_copy(model)
    return work, add_zero_biases(work)


def add_zero_biases(module: nn.Module) -> list[str]:
    """Give every Linear / Conv1d / Conv2d of ``module`` without a bias a zero one, in place
    (``module`` must be the caller's own copy); returns their paths."""
    return [path for path, mod in module.named_modules() if _biasable(mod) and zero_bias(mod)]


def strip_unused(small: nn.Module, plan: Plan, added: list[str], nonzero: set[str] | None = None) -> None:
    """Remove the added biases that are still all zero; record the others in ``plan.biases``.

    ``nonzero``: the paths whose bias is not all zero, when ``small`` cannot say (a meta model
    whose weights are written elsewhere, as ``compact_checkpoint`` does)."""
    kept = []
    for path in added:
        mod = small.get_submodule(path)
        b = getattr(mod, "bias", None)
        if nonzero is not None:
            unused = path not in nonzero
        else:
            unused = isinstance(b, torch.Tensor) and not b.is_meta and bool((b == 0).all())
        if unused:
            mod.bias = None
            name = f"{path}.bias" if path else "bias"
            plan.slices.pop(name, None)
            plan.shapes.pop(name, None)
        else:
            kept.append(path)
    plan.biases = sorted(kept)
