"""Normalising what users pass as ``example_input`` and what models return.

Users hand us a tensor, a tuple of tensors or a dict of keyword inputs; models return tensors,
tuples, dicts or Hugging Face ``ModelOutput`` objects. Every stage (tracing, verification, ONNX
export, benchmarking) needs the same two views: ``(args, kwargs)`` going in, a flat list of
tensors coming out. Keeping both conversions here means they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphprune.errors import InputError

ExampleInput = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def normalize_inputs(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    A tensor becomes one positional argument, a tuple/list becomes the positional arguments and a
    dict becomes keyword arguments.
    """
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise InputError(
        f"example_input must be a tensor, a tuple of tensors or a dict of keyword inputs, "
        f"got {type(example_input).__name__}. Wrap a single input as a tensor, several as a tuple."
    )


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


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards.

    ``model.train(old)`` would not do: a user may keep some submodules (frozen BN) in a mode of
    their own, and measuring must not change that.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
