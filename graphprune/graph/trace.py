"""Front end: turn (model, example_input) into a torch.export program, with clear errors."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError, TraceError
from graphprune.graph.inputs import flatten_outputs, normalize_inputs


@dataclass
class Traced:
    """A traced model: the program plus how its placeholders map to the model's tensors."""

    program: torch.export.ExportedProgram
    param_names: dict[str, str]  # placeholder name -> parameter/buffer/constant FQN
    user_outputs: list[str]  # names of graph nodes returned to the user
    output_shapes: list[tuple[int, ...]]


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model object itself (not its state_dict or a path); the CLI loads files for you."
        )
    return model


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face decoders return cache objects torch.export cannot output: trace without."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None and old:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and old:
            config.use_cache = old


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch.export logs whole graphs on failure; our error already says what went wrong."""
    names = ["torch._dynamo", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch/graphprune: where in the user's code it failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not re.search(r"(site-packages|dist-packages)/(torch|graphprune)|/graphprune/", fr.filename):
            return f"{fr.filename}:{fr.lineno} ({fr.line})"
    return ""


def node_source(node: Any) -> str:
    """Where in the user's code an exported node came from: its innermost frame outside torch and
    graphprune, read from ``node.stack_trace`` ("" when the exporter recorded none)."""
    stack = getattr(node, "stack_trace", None) or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack)
    for filename, lineno, code in reversed(frames):
        if not re.search(r"(site-packages|dist-packages)/(torch|graphprune)|/graphprune/", filename):
            return f"{filename}:{lineno} ({code.strip()})"
    return ""


def reference_outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    """Run the model once; a model that rejects the input gets a clear error."""
    args, kwargs = normalize_inputs(example_input)
    try:
        with torch.no_grad(), no_cache(model):
            out = model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's input
        where = _user_frame(exc)
        raise InputError(
            f"the model rejected the example input: {type(exc).__name__}: {_first_line(exc)}"
            + (f" (at {where})" if where else "")
            + ". Pass an example_input the model accepts: a tensor, a tuple of positional inputs, "
            "or a dict of keyword inputs, with the shape and dtype used in training."
        ) from exc
    _register_dataclasses(out)
    return flatten_outputs(out)


def _register_dataclasses(output: Any) -> None:
    """Make dataclass outputs exportable: torch.export only accepts pytree-registered types.

    Registration is global and permanent (torch offers no scoped form); it only tells torch how
    to take the dataclass apart, which it then does the same way everywhere.
    """
    from torch.utils import _pytree as pytree

    if isinstance(output, torch.Tensor) or output is None:
        return
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        cls = type(output)
        if cls not in pytree.SUPPORTED_NODES:
            try:
                torch.export.register_dataclass(cls)
            except Exception:  # noqa: BLE001 - export will then explain what it cannot handle
                return
        children = [getattr(output, f.name) for f in dataclasses.fields(output)]
    elif isinstance(output, dict):
        children = list(output.values())
    elif isinstance(output, (list, tuple)):
        children = list(output)
    else:
        return
    for child in children:
        _register_dataclasses(child)


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of a shared (tied) tensor -> its first name, the one ``named_parameters`` gives.

    torch.export may give a tied weight (GPT-2's ``lm_head.weight`` is ``wte.weight``) one
    placeholder per name; mapping them to one name makes the rules see one tensor, so both uses
    are coupled and the tensor is sliced once.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        out[name] = first.setdefault(id(t), name)
    return out


def trace(model: nn.Module, example_input: Any) -> Traced:
    """Export ``model`` (already an eval-mode copy) with torch.export, non-strict."""
    args, kwargs = normalize_inputs(example_input)
    outputs = reference_outputs(model, example_input)
    try:
        with warnings.catch_warnings(), no_cache(model), quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001
        where = _user_frame(exc)
        raise TraceError(
            f"torch.export could not trace the model: {type(exc).__name__}: {_first_line(exc)}"
            + (f" (at {where})" if where else "")
            + ". graphprune needs a traceable forward: replace Python control flow that depends on "
            "tensor values (if x.sum() > 0, .item(), data-dependent shapes) by torch ops such as "
            "torch.where / torch.cond, or pass ignored_layers for the offending module."
        ) from exc
    sig = program.graph_signature
    names: dict[str, str] = {}
    canonical = _canonical_names(model)
    for spec in sig.input_specs:
        if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            names[spec.arg.name] = canonical.get(spec.target, spec.target)
    user_outputs = [
        spec.arg.name
        for spec in sig.output_specs
        if spec.kind.name == "USER_OUTPUT" and hasattr(spec.arg, "name")
    ]
    return Traced(program, names, user_outputs, [tuple(o.shape) for o in outputs])


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode: graphprune never touches the user's model."""
    work = copy.deepcopy(model)
    work.eval()
    return work
