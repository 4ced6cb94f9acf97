"""Normalising what users pass as ``example_input`` and what models return.

Users hand us a tensor, a tuple of tensors or a dict of keyword inputs; models return tensors,
tuples, dicts or Hugging Face ``ModelOutput`` objects. Every stage (tracing, verification, ONNX
export, benchmarking) needs the same two views: ``(args, kwargs)`` going in, a flat list of
tensors coming out. Keeping both conversions here means they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphprune.errors import InputError

ExampleInput = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def normalize_inputs(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    A tensor becomes one positional argument, a tuple/list becomes the positional arguments and a
    dict becomes keyword arguments. Tensors are fresh copies (see ``fresh``): never the caller's.
    """
    if isinstance(example_input, torch.Tensor):
        return (fresh(example_input),), {}
    if isinstance(example_input, Mapping):
        return (), {k: fresh(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return tuple(fresh(v) for v in example_input), {}
    raise InputError(
        f"example_input must be a tensor, a tuple of tensors or a dict of keyword inputs, "
        f"got {type(example_input).__name__}. Wrap a single input as a tensor, several as a tuple."
    )


def fresh(value: Any) -> Any:
    """``value`` with every tensor in it copied (tuples, lists and dicts rebuilt).

    ``normalize_inputs`` hands out fresh copies on every call: a forward that writes into its
    input (``x.mul_(0.5)``) must neither change the caller's tensors nor see, on its next run,
    what the previous run wrote. Inputs are small next to a model; copying them is cheap.
    """

    def clone(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        return c.requires_grad_(True) if t.requires_grad and (c.is_floating_point() or c.is_complex()) else c

    return pytree.tree_map(clone, value)


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor / tuple / list / dict / dataclass / ModelOutput) to tensors.

    Order is deterministic (sequence order, dict insertion order, dataclass field order), so two
    outputs of the same structure flatten to comparable lists. Non-tensor leaves are dropped.
    """
    if isinstance(output, torch.Tensor):
        return [output]
    if output is None:
        return []
    if isinstance(output, Mapping):  # includes transformers.ModelOutput
        return [t for v in output.values() for t in flatten_outputs(v)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for f in dataclasses.fields(output) for t in flatten_outputs(getattr(output, f.name))]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in flatten_outputs(v)]
    if hasattr(output, "to_legacy_cache") or hasattr(output, "layers"):  # HF cache objects
        return []
    return []


def run_model(model: torch.nn.Module, example_input: Any) -> Any:
    """Call ``model`` on ``example_input`` under ``torch.no_grad`` (on fake tensors if on meta)."""
    args, kwargs = normalize_inputs(example_input)
    with torch.no_grad():
        return forward(model, args, kwargs)


def on_meta(model: torch.nn.Module, example_input: Any = None) -> bool:
    """Does ``model`` (or the example input) hold tensors on the meta device (shapes, no values)?"""
    tensors = [*model.parameters(), *model.buffers()]
    if example_input is not None:
        args, kwargs = normalize_inputs(example_input)
        tensors += [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return any(t.is_meta for t in tensors)


def forward(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``model(*args, **kwargs)``; a model on the meta device runs on fake tensors.

    A meta tensor has a shape but no values, so library code that asks a value (Hugging Face's
    mask helpers call ``.item()`` to look for packed sequences) fails on it. Fake tensors are
    what torch.export traces with, and libraries skip such value checks while tracing; running
    a meta model on them gives the output shapes that torch.export would see. Values stay
    unknown: callers skip numeric checks for meta models (``on_meta``).
    """
    if not on_meta(model) and not any(
        isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves((args, kwargs))
    ):
        return model(*args, **kwargs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        return model(*args, **kwargs)

