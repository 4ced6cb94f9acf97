"""Apply a plan to a model: slice tensors, then fix the attributes that describe their sizes.

Surgery never traces: it needs only the plan, so the same code replays a saved plan on a freshly
built base model. Two kinds of attribute changes exist:

* module-type ones derived from the new tensor shapes (``in_channels``, ``out_features``,
  ``num_features``, ``groups``, ``normalized_shape`` ...), and
* integers a module's ``forward`` feeds to reshapes (``self.num_heads``, ``self.all_head_size``):
  found by the planner from the traced graph and stored in the plan as ``AttrUpdate``s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphprune.errors import PlanMismatchError
from graphprune.graph.analysis import param_tensor
from graphprune.graph.lookup import submodule
from graphprune.planning.plan import AttrUpdate, Plan


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace tensor ``name`` keeping Parameter identity, so tied weights stay tied."""
    mod_name, _, attr = name.rpartition(".")
    mod = submodule(model, mod_name)
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        old.data = value
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        setattr(mod, attr, value)


def plan_tensor(model: nn.Module, name: str, verb: str) -> torch.Tensor:
    """Tensor ``name`` that the plan ``verb``s ("slices", "rescales"), or a PlanMismatchError."""
    try:
        return param_tensor(model, name)
    except AttributeError as exc:
        raise PlanMismatchError(
            f"the plan {verb} {name!r} but the model has no such tensor; apply the plan to the same "
            "architecture it was made for."
        ) from exc


def scale_tensors(model: nn.Module, plan: Plan) -> None:
    """Multiply the plan's rows by their factors (before slicing: indices are the original ones).

    Out of place: the model's tensors may share memory with the user's (``trace.shared_copy``).
    """
    with torch.no_grad():
        for entry in plan.scales:
            set_tensor(model, entry["tensor"], scaled(plan_tensor(model, entry["tensor"], "rescales"), entry))


def scaled(t: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """``t`` with rows ``entry["index"]`` along ``entry["dim"]`` times ``entry["factor"]`` (new tensor)."""
    t, dim = t.detach(), entry["dim"]
    index = torch.tensor(entry["index"], dtype=torch.long, device=t.device)
    return t.index_copy(dim, index, t.index_select(dim, index) * entry["factor"])


class Indices:
    """Kept-index lists as index tensors, made once per list and device: the tensors of a group
    share one list (``plan.slices_of``), and converting it for each tensor was most of slicing a
    small network. The lists must stay alive (and unchanged) while this is used."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, torch.device], tuple[torch.Tensor, int]] = {}

    def get(self, kept: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
        """(``kept`` as a long tensor on ``device``, its largest index or -1)."""
        key = (id(kept), device)
        found = self.made.get(key)
        if found is None:
            found = self.made[key] = (torch.tensor(kept, dtype=torch.long, device=device),
                                      max(kept) if len(kept) else -1)
        return found


def sliced(t: torch.Tensor, dims: dict[int, list[int]], name: str = "tensor",
           indices: Indices | None = None) -> torch.Tensor:
    """A new contiguous tensor holding the kept positions ``dims`` ({dim: kept indices}) of ``t``."""
    indices = indices or Indices()
    new = t.detach()
    for dim, kept in sorted(dims.items()):
        index, top = indices.get(kept, new.device)
        if dim >= new.dim() or top >= new.shape[dim]:
            raise PlanMismatchError(
                f"the plan's indices for {name} dim {dim} do not fit its shape {tuple(t.shape)}"
            )
        new = new.index_select(dim, index)
    return new.contiguous()


def slice_tensors(
    model: nn.Module, plan: Plan, on_slice: Callable[[str, torch.Tensor], None] | None = None
) -> None:
    """Replace every tensor the plan slices by a new, smaller one (never written in place).

    ``on_slice(name, new)`` is called after each replacement (``compact(inplace=True)`` uses it to
    hand the new tensor to the user's model at once, so the old one is freed tensor by tensor).
    """
    scale_tensors(model, plan)
    indices = Indices()
    for name, dims in plan.slices.items():
        t = plan_tensor(model, name, "slices")
        expected = plan.shapes.get(name)
        if expected is not None and list(t.shape) != list(expected):
            raise PlanMismatchError(
                f"the plan expects {name} of shape {tuple(expected)} but the model has {tuple(t.shape)}; "
                "build the base model with the same configuration the plan was made for."
            )
        new = sliced(t, dims, name, indices)
        set_tensor(model, name, new)
        if on_slice is not None:
            on_slice(name, new)


def _shape_of(mod: nn.Module, name: str) -> tuple[int, ...] | None:
    t = getattr(mod, name, None)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def module_updates(model: nn.Module) -> list[AttrUpdate]:
    """Attribute values implied by the (already sliced) tensor shapes of standard modules."""
    ups: list[AttrUpdate] = []

    def upd(path: str, mod: nn.Module, attr: str, new: Any) -> None:
        old = getattr(mod, attr)
        if old != new:
            ups.append(AttrUpdate(path, attr, old, new))

    for path, mod in model.named_modules():
        w = _shape_of(mod, "weight")
        if isinstance(mod, nn.modules.conv._ConvNd) and w is not None:
            if mod.transposed:
                groups = mod.groups * w[0] // mod.in_channels if mod.groups > 1 else 1
                upd(path, mod, "in_channels", w[0])
                upd(path, mod, "out_channels", w[1] * groups)
            else:
                groups = mod.groups * w[0] // mod.out_channels if mod.groups > 1 else 1
                upd(path, mod, "out_channels", w[0])
                upd(path, mod, "in_channels", w[1] * groups)
            upd(path, mod, "groups", groups)
        elif isinstance(mod, nn.Linear) and w is not None:
            upd(path, mod, "in_features", w[1])
            upd(path, mod, "out_features", w[0])
        elif isinstance(mod, nn.Bilinear) and w is not None:
            upd(path, mod, "out_features", w[0])
            upd(path, mod, "in1_features", w[1])
            upd(path, mod, "in2_features", w[2])
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            shape = _shape_of(mod, "running_mean") or w
            if shape is not None:
                upd(path, mod, "num_features", shape[0])
        elif isinstance(mod, nn.GroupNorm) and w is not None:
            upd(path, mod, "num_groups", mod.num_groups * w[0] // mod.num_channels)
            upd(path, mod, "num_channels", w[0])
        elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
            upd(path, mod, "normalized_shape", tuple(w))
        elif isinstance(mod, nn.Embedding) and w is not None:
            upd(path, mod, "embedding_dim", w[1])
        elif isinstance(mod, nn.PReLU) and w is not None:
            upd(path, mod, "num_parameters", w[0])
        elif isinstance(mod, nn.MultiheadAttention):
            _mha_updates(path, mod, upd)
        elif isinstance(mod, nn.RNNBase) and mod.proj_size == 0:
            upd(path, mod, "input_size", mod.weight_ih_l0.shape[1])
            upd(path, mod, "hidden_size", mod.weight_hh_l0.shape[1])
        elif type(mod).__name__ == "Conv1D" and w is not None and hasattr(mod, "nf"):
            upd(path, mod, "nx", w[0])  # Hugging Face GPT-2's transposed Linear: weight (nx, nf)
            upd(path, mod, "nf", w[1])
    return ups


def _mha_updates(path: str, mod: nn.MultiheadAttention, upd: Any) -> None:
    """nn.MultiheadAttention's sizes follow its (sliced) projection weights; heads keep their width."""
    embed = mod.out_proj.weight.shape[0]
    upd(path, mod, "embed_dim", embed)
    upd(path, mod, "num_heads", embed // mod.head_dim)
    if mod._qkv_same_embed_dim:
        upd(path, mod, "kdim", embed)
        upd(path, mod, "vdim", embed)
    else:
        upd(path, mod, "kdim", mod.k_proj_weight.shape[1])
        upd(path, mod, "vdim", mod.v_proj_weight.shape[1])


def apply_attr_updates(model: nn.Module, updates: list[AttrUpdate]) -> None:
    for u in updates:
        mod = submodule(model, u.module)
        keep_tuple = isinstance(u.old, tuple) or isinstance(getattr(mod, u.attr, None), tuple)
        new = tuple(u.new) if keep_tuple and isinstance(u.new, list) else u.new
        setattr(mod, u.attr, new)


def add_planned_biases(model: nn.Module, plan: Plan) -> None:
    """Zero biases where the plan's reconstruction added one (``plan.biases``), before slicing."""
    for path in plan.biases:
        zero_bias(submodule(model, path))


def zero_bias(mod: nn.Module) -> bool:
    """Give a layer without a bias a zero one, sized by its weight's first dim; True if added."""
    w = getattr(mod, "weight", None)
    if getattr(mod, "bias", None) is not None or not isinstance(w, torch.Tensor):
        return False
    mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)
    return True


def replay(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (call it on a copy)."""
    add_planned_biases(model, plan)
    slice_tensors(model, plan)
    derived = module_updates(model)
    computed = {(u.module, u.attr): u.new for u in derived}
    for u in plan.attr_updates:  # the plan's copy of a shape-derived size must agree with the shapes
        if (u.module, u.attr) in computed and list(_as_tuple(computed[u.module, u.attr])) != list(
            _as_tuple(u.new)
        ):
            raise PlanMismatchError(
                f"the plan sets {u.module}.{u.attr} to {u.new!r} but its sliced tensors make it "
                f"{computed[u.module, u.attr]!r}"
            )
        derivable = u.attr in MODULE_ATTRS and _is_torch_module(model, u.module)
        if (u.module, u.attr) not in computed and derivable:
            raise PlanMismatchError(
                f"the plan changes {u.module}.{u.attr} to {u.new!r} but its sliced tensors leave it at "
                f"{u.old!r}"
            )
    apply_attr_updates(model, derived)
    apply_attr_updates(model, [u for u in plan.attr_updates if (u.module, u.attr) not in computed])
    return model


def _is_torch_module(model: nn.Module, path: str) -> bool:
    """A module of torch.nn itself, whose size attributes module_updates derives from its tensors
    (a user's module may hold an attribute of the same name, e.g. ``groups``, that a reshape uses)."""
    try:
        mod = submodule(model, path)
    except AttributeError:
        return False
    return type(mod).__module__.startswith("torch.nn.")


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


MODULE_ATTRS = {
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_groups",
    "num_channels",
    "normalized_shape",
    "embedding_dim",
    "num_parameters",
    "in1_features",
    "in2_features",
}
