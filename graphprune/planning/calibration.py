"""Calibration batches: one convention for every feature that runs the model on user data.

Data-driven importance (Taylor, Hessian, activations), SNIP, sensitivity analysis and
``recover`` all iterate over "batches" the user hands in. Keeping the convention in one place
means a user learns it once:

* a batch that is a 2-tuple/list ``(inputs, target)`` is the ``DataLoader`` convention: the
  model gets ``inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)
  and ``loss_fn(output, target)`` gets the target;
* any other batch (a tensor, a dict such as a Hugging Face batch) is ``inputs`` alone and
  ``loss_fn(output)`` is called; a Hugging Face output carrying ``.loss`` needs no ``loss_fn``.

A model taking two positional tensors and no target must therefore be fed ``((a, b), None)``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.inputs import normalize_inputs

LossFn = Callable[..., torch.Tensor]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch (target ``None`` when the batch is inputs only)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor leaf of ``obj`` to ``device`` (structure kept)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def forward(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def batches(data: Any, what: str, max_batches: int | None = None) -> Iterator[Any]:
    """Iterate over ``data`` (any iterable of batches), refusing a missing or empty one clearly."""
    if data is None:
        raise InputError(
            f"{what} needs calibration data: pass data=<an iterable of batches>, e.g. a DataLoader "
            "yielding (inputs, target) pairs or a list of input tensors."
        )
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise InputError(
            f"{what}: data must be an iterable of batches (a DataLoader, a list of (inputs, target) "
            f"pairs...), got {type(data).__name__}. Wrap a single batch as [batch]."
        )
    n = 0
    for batch in data:
        if max_batches is not None and n >= max_batches:
            break
        n += 1
        yield batch
    if n == 0:
        raise InputError(f"{what}: data yielded no batches; give at least one calibration batch.")


def compute_loss(loss_fn: LossFn | None, output: Any, target: Any, what: str) -> torch.Tensor:
    """``loss_fn(output, target)`` (or ``loss_fn(output)``), or the ``.loss`` a HF model returned."""
    if loss_fn is None:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss
        raise InputError(
            f"{what} needs a loss: pass loss_fn=<callable(output, target) -> scalar tensor>, "
            "e.g. loss_fn=torch.nn.functional.cross_entropy (or feed labels to a Hugging Face "
            "model so that its output carries .loss)."
        )
    loss = loss_fn(output, target) if target is not None else loss_fn(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InputError(f"{what}: loss_fn must return a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def split_samples(batch: Any) -> list[Any]:
    """Split a batch into single-sample batches (every tensor leaf along dim 0).

    Used for per-sample gradients (the empirical Fisher is a mean of per-sample squared
    gradients; the square of a batch gradient is a different, biased quantity). Non-tensor
    leaves are repeated. A batch without tensors is returned whole.
    """
    sizes: list[int] = []

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor) and o.dim() > 0:
            sizes.append(o.shape[0])
        elif isinstance(o, Mapping):
            for v in o.values():
                visit(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                visit(v)

    visit(batch)
    if not sizes or len(set(sizes)) != 1:
        return [batch]

    def take(o: Any, i: int) -> Any:
        if isinstance(o, torch.Tensor) and o.dim() > 0:
            return o[i : i + 1]
        if isinstance(o, Mapping):
            return {k: take(v, i) for k, v in o.items()}
        if isinstance(o, (tuple, list)):
            return type(o)(take(v, i) for v in o)
        return o

    return [take(batch, i) for i in range(sizes[0])]


@contextlib.contextmanager
def grads_enabled(model: nn.Module) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Every parameter requires grad inside the block (restored after): frozen ones get scored too."""
    params = list(model.named_parameters())
    old = [p.requires_grad for _, p in params]
    try:
        with torch.enable_grad():
            for _, p in params:
                p.requires_grad_(True)
            yield params
    finally:
        for (_, p), flag in zip(params, old):
            p.requires_grad_(flag)
