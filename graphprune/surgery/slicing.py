"""Apply a plan to a model: slice tensors, then fix the attributes that describe their sizes.

Surgery never traces: it needs only the plan, so the same code replays a saved plan on a freshly
built base model. Two kinds of attribute changes exist:

* module-type ones derived from the new tensor shapes (``in_channels``, ``out_features``,
  ``num_features``, ``groups``, ``normalized_shape`` ...), and
* integers a module's ``forward`` feeds to reshapes (``self.num_heads``, ``self.all_head_size``):
  found by the planner from the traced graph and stored in the plan as ``AttrUpdate``s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphprune.errors import PlanMismatchError
from graphprune.graph.analysis import param_tensor
from graphprune.planning.plan import AttrUpdate, Plan


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace tensor ``name`` keeping Parameter identity, so tied weights stay tied."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
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
    """Multiply the plan's rows by their factors (before slicing: indices are the original ones)."""
    with torch.no_grad():
        for entry in plan.scales:
            t = plan_tensor(model, entry["tensor"], "rescales")
            index = torch.tensor(entry["index"], dtype=torch.long, device=t.device)
            t.index_copy_(entry["dim"], index, t.index_select(entry["dim"], index) * entry["factor"])


def slice_tensors(model: nn.Module, plan: Plan) -> None:
    scale_tensors(model, plan)
    for name, dims in plan.slices.items():
        t = plan_tensor(model, name, "slices")
        expected = plan.shapes.get(name)
        if expected is not None and list(t.shape) != list(expected):
            raise PlanMismatchError(
                f"the plan expects {name} of shape {tuple(expected)} but the model has {tuple(t.shape)}; "
                "build the base model with the same configuration the plan was made for."
            )
        new = t.detach()
        for dim, kept in sorted(dims.items()):
            if dim >= new.dim() or (kept and max(kept) >= new.shape[dim]):
                raise PlanMismatchError(
                    f"the plan's indices for {name} dim {dim} do not fit its shape {tuple(t.shape)}"
                )
            new = new.index_select(dim, torch.tensor(kept, dtype=torch.long, device=new.device))
        set_tensor(model, name, new.contiguous())


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
        mod = model.get_submodule(u.module) if u.module else model
        new = tuple(u.new) if isinstance(u.old, tuple) and isinstance(u.new, list) else u.new
        setattr(mod, u.attr, new)


def add_planned_biases(model: nn.Module, plan: Plan) -> None:
    """Zero biases where the plan's reconstruction added one (``plan.biases``), before slicing."""
    for path in plan.biases:
        zero_bias(model.get_submodule(path) if path else model)


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
    apply_attr_updates(model, module_updates(model))
    apply_attr_updates(model, [u for u in plan.attr_updates if u.attr not in MODULE_ATTRS])
    return model


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
