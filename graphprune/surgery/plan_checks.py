"""Is this plan one graphprune could have written for this model? Checked before it is replayed.

A plan replayed by ``graphprune.load`` or ``apply_plan`` may come from a file, so every change it
asks for is checked against what the engine itself would do:

* every sliced tensor exists with the shape the plan was made on, and every kept index fits;
* a rescale factor is sqrt(kept / total) of a dimension the plan slices on that very tensor (the
  only factors the engine writes, for SDPA's default scale);
* an attribute change is a **size the slices imply**: on torch.nn's own modules only the size
  attributes graphprune maintains (``in_channels``, ``num_features``, ``num_heads``, ...; never
  ``padding``, ``stride``, ``dilation``...), and on any module an integer (or tuple of integers)
  that shrinks by exactly the fraction kept along some sliced dimension (``num_heads`` 12 -> 8
  when a projection keeps 512 of 768 rows). The attributes derived from tensor shapes must
  moreover equal what the sliced shapes give (checked by ``surgery.slicing.replay``).

Anything else is a ``PlanMismatchError`` that names the attribute: a tampered file can at worst be
refused, never load as a different model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graphprune.errors import PlanMismatchError
from graphprune.planning.plan import AttrUpdate, Plan
from graphprune.surgery.slicing import plan_tensor

# Size attributes graphprune maintains on torch.nn's own modules (derived from tensor shapes, or
# integers their forward feeds to reshapes): nothing else of a torch.nn module may change.
TORCH_SIZE_ATTRS = frozenset({
    "in_channels", "out_channels", "groups", "in_features", "out_features", "in1_features",
    "in2_features", "num_features", "num_groups", "num_channels", "normalized_shape",
    "embedding_dim", "num_parameters", "embed_dim", "num_heads", "head_dim", "kdim", "vdim",
    "input_size", "hidden_size", "unflattened_size",
})
# Names that are never sizes, whatever module holds them (a conv's geometry, a norm's epsilon).
NEVER_SIZES = frozenset({
    "padding", "stride", "dilation", "kernel_size", "output_padding", "padding_idx", "max_norm",
    "norm_type", "eps", "momentum", "num_layers", "proj_size",
})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _values(v: Any) -> list[int] | None:
    if _is_int(v):
        return [v]
    if isinstance(v, (list, tuple)) and all(_is_int(x) for x in v):
        return list(v)
    return None


def kept_fractions(plan: Plan, model: nn.Module) -> set[tuple[int, int]]:
    """(kept, total) of every sliced dimension (total from the plan's shapes, else the model)."""
    out = set()
    added = added_bias_names(plan)
    for name, dims in plan.slices.items():
        shape = plan.shapes.get(name)
        if shape is None:
            if name in added:
                continue  # an added bias: its weight's slice says the same
            shape = list(plan_tensor(model, name, "slices").shape)
        for dim, kept in dims.items():
            if dim < len(shape):
                out.add((len(kept), int(shape[dim])))
    return out


def implied_by_slices(old: int, new: int, fractions: set[tuple[int, int]]) -> bool:
    """``new`` is ``old`` shrunk by exactly the fraction some sliced dimension keeps."""
    return 0 < new < old and any(new * total == old * kept for kept, total in fractions)


def _split_shrink(old: list[int], new: list[int], fractions: set[tuple[int, int]]) -> bool:
    """A list of split sizes (``torch.split(x, self.split_sizes)``): its parts cut one sliced
    dimension, so their total shrinks by that dimension's fraction while no part grows."""
    return all(0 <= y <= x for x, y in zip(old, new, strict=True)) and implied_by_slices(
        sum(old), sum(new), fractions
    )


def check_size_change(
    where: str, attr: str, old: Any, new: Any, fractions: set[tuple[int, int]], what: str = "the plan"
) -> None:
    """Raise unless ``old -> new`` is a shrink of integer sizes that the slices imply."""
    a, b = _values(old), _values(new)
    if a is None or b is None or len(a) != len(b):
        raise PlanMismatchError(
            f"{what} sets {where}.{attr} from {old!r:.40} to {new!r:.40}: only integer sizes may be changed"
        )
    if len(a) > 1 and _split_shrink(a, b, fractions):
        return
    for x, y in zip(a, b, strict=True):
        if x != y and not implied_by_slices(x, y, fractions):
            raise PlanMismatchError(
                f"{what} changes {where}.{attr} from {old!r} to {new!r}, which no sliced dimension "
                "implies (a size shrinks by the fraction its tensors keep); refusing a file that "
                "would change the model in other ways."
            )


def check_attr_update(model: nn.Module, u: AttrUpdate, fractions: set[tuple[int, int]]) -> None:
    where = u.module or type(model).__name__
    try:
        mod = model.get_submodule(u.module) if u.module else model
    except AttributeError as exc:
        raise PlanMismatchError(
            f"the plan changes {u.module}.{u.attr} but the base model has no module {u.module!r}"
        ) from exc
    if u.attr in NEVER_SIZES or u.attr.startswith("_"):
        raise PlanMismatchError(
            f"the plan changes {where}.{u.attr} ({type(mod).__name__}): graphprune only ever changes "
            "sizes, never a layer's geometry or hyper-parameters; the file was not written by graphprune."
        )
    builtin = type(mod).__module__.startswith("torch.nn.")
    if builtin and u.attr not in TORCH_SIZE_ATTRS:
        raise PlanMismatchError(
            f"the plan changes {where}.{u.attr}, which is not a size attribute of {type(mod).__name__} "
            f"(graphprune changes only {', '.join(sorted(TORCH_SIZE_ATTRS))})"
        )
    if not hasattr(mod, u.attr):
        raise PlanMismatchError(
            f"the plan changes {where}.{u.attr} but that module has no attribute {u.attr!r}"
        )
    current = getattr(mod, u.attr)
    if _values(current) != _values(u.old) or _values(current) is None:
        raise PlanMismatchError(
            f"the plan expects {where}.{u.attr} == {u.old!r} in the base model, found {current!r}; "
            "build the base model with the configuration the plan was made for."
        )
    check_size_change(where, u.attr, u.old, u.new, fractions)


def check_rescales(model: nn.Module, plan: Plan) -> None:
    """Every rescale multiplies rows of a tensor the plan slices, by sqrt(kept/total) of that slice."""
    for entry in plan.scales:
        name = str(entry.get("tensor"))
        t = plan_tensor(model, name, "rescales")
        try:
            dim, index, factor = int(entry["dim"]), list(entry["index"]), float(entry["factor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanMismatchError(f"the plan's rescale entry {entry!r:.80} is malformed") from exc
        if dim >= t.dim() or not all(0 <= i < t.shape[dim] for i in index):
            raise PlanMismatchError(f"the plan's rescaled rows of {name} do not fit its shape")
        shape = plan.shapes.get(name, list(t.shape))
        own = [(len(k), int(shape[d])) for d, k in plan.slices.get(name, {}).items() if d < len(shape)]
        if not any(math.isclose(factor * factor, k / n, rel_tol=1e-9) for k, n in own):
            raise PlanMismatchError(
                f"the plan rescales {name} by {factor!r}, which is not sqrt(kept/total) of a dimension "
                "the plan slices on it (the only rescale graphprune writes, for SDPA's default scale)"
            )


def added_bias_names(plan: Plan) -> set[str]:
    """Tensor names of the biases the plan adds (``plan.biases``, reconstruction's bias
    compensation): replay creates them, so the model does not have them yet."""
    return {f"{path}.bias" if path else "bias" for path in plan.biases}


def added_biases(model: nn.Module, plan: Plan) -> set[str]:
    """``added_bias_names``, each checked to sit next to a weight of the model, on a layer that
    has no bias yet."""
    for path in plan.biases:
        plan_tensor(model, f"{path}.weight" if path else "weight", "adds a bias next to")
        mod = model.get_submodule(path) if path else model
        if getattr(mod, "bias", None) is not None:
            raise PlanMismatchError(f"the plan adds a bias to {path!r}, which already has one")
    return added_bias_names(plan)


def check_plan_tensors(model: nn.Module, plan: Plan) -> None:
    """Every sliced tensor exists with the plan's original shape and every kept index is in range."""
    added = added_biases(model, plan)
    for name, dims in plan.slices.items():
        if name in added:
            continue  # replay creates it (zeros sized by the weight) before slicing
        t = plan_tensor(model, name, "slices")
        if not isinstance(t, torch.Tensor):
            raise PlanMismatchError(f"the plan slices {name!r} but the base model's {name} is not a tensor")
        expected = plan.shapes.get(name)
        if expected is not None and list(t.shape) != list(expected):
            raise PlanMismatchError(
                f"the plan expects {name} of shape {tuple(expected)} but the base model has "
                f"{tuple(t.shape)}; build the base model with the configuration the plan was made for."
            )
        for dim, kept in dims.items():
            if dim >= t.dim() or not kept or min(kept) < 0 or max(kept) >= t.shape[dim]:
                raise PlanMismatchError(
                    f"the plan's kept indices for {name} dim {dim} do not fit its shape {tuple(t.shape)}"
                )


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Raise ``PlanMismatchError`` unless ``plan`` is one the engine could have made for ``model``."""
    check_plan_tensors(model, plan)
    check_rescales(model, plan)
    fractions = kept_fractions(plan, model)
    for u in plan.attr_updates:
        check_attr_update(model, u, fractions)
