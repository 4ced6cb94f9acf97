"""What every sub-command shares: resolving a MODEL argument and the analysis flags.

MODEL is one of

* ``package.module:callable`` (or ``path/to/file.py:callable``): the callable is called with no
  arguments and returns a model, or a ``(model, example_input)`` pair;
* ``zoo:NAME``: a built-in model from ``graphprune.zoo`` (``graphprune zoo`` lists them;
  ``--size tiny|bench`` picks the size);
* a path to a file written by ``torch.save(model)``. Loading it runs pickle, which can execute
  arbitrary code: only load files you trust.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import InputError
from graphprune.graph.analysis import ATTENTION_MODES
from graphprune.planning.importance import weight_only_criteria

# ---------------------------------------------------------------------------------------------
# Resolving MODEL
# ---------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(
            f"--input-shape must be positive integers separated by commas, e.g. 1,3,224,224; "
            f"got {text!r}"
        )
    return shape


def load_model(
    spec: str, input_shape: tuple[int, ...] | None = None, size: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """Resolve a MODEL argument to ``(model, example_input)``; see the module docstring.

    ``input_shape`` (a random ``float32`` tensor of that shape, fixed seed) overrides any example
    input the spec provides; it is required when the spec provides none.
    """
    if spec.startswith("zoo:"):
        model, example = _load_zoo(spec[len("zoo:") :], size)
    elif Path(spec).is_file():
        model, example = _load_saved(Path(spec))
    elif ":" in spec:
        model, example = _load_callable(spec)
    elif spec.endswith((".pt", ".pth", ".pkl", ".bin")):
        raise InputError(f"no such file {spec!r} (MODEL)")
    else:
        raise InputError(
            f"cannot resolve MODEL {spec!r}: it is not an existing file, not 'module:callable' "
            f"and not 'zoo:NAME'. Examples: mypkg.models:build_resnet, ./model.pt, zoo:mlp."
        )
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module. A callable "
            f"must return a model or a (model, example_input) pair."
        )
    if input_shape is not None:
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(*input_shape, generator=gen)
    if example is None:
        raise InputError(
            f"MODEL {spec!r} comes without an example input: pass --input-shape, "
            f"e.g. --input-shape 1,3,224,224 (or let the callable return (model, example_input))."
        )
    return model.eval(), example


def _split_result(obj: Any) -> tuple[Any, Any]:
    """A factory may return a model or a ``(model, example_input)`` pair."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], torch.nn.Module):
        return obj[0], obj[1]
    return obj, None


def _load_zoo(name: str, size: str | None) -> tuple[Any, Any]:
    from graphprune import zoo

    if name not in zoo.names():
        raise InputError(
            f"unknown zoo model {name!r}; known: {', '.join(zoo.names())} (see 'graphprune zoo')"
        )
    size = size or "tiny"
    if size not in zoo.SIZES:
        raise InputError(f"--size must be one of {', '.join(zoo.SIZES)} for zoo models, got {size!r}")
    return _split_result(zoo.build(name, size))


def _load_saved(path: Path) -> tuple[Any, Any]:
    try:
        # weights_only=False unpickles arbitrary objects (the whole module): trusted files only.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user-facing input error
        raise InputError(
            f"cannot load {str(path)!r} with torch.load: {type(exc).__name__}: {exc}. MODEL files "
            f"must be written with torch.save(model), and the model's class must be importable."
        ) from exc
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{str(path)!r} holds a state_dict, not a model: graphprune needs the architecture "
            f"too. Save with torch.save(model), or use a 'module:callable' that builds the model "
            f"and loads the weights."
        )
    return _split_result(obj)


def _load_callable(spec: str) -> tuple[Any, Any]:
    module_name, _, attr_path = spec.rpartition(":")
    if not module_name or not attr_path:
        raise InputError(f"MODEL {spec!r} must look like 'package.module:callable'")
    module = _import(module_name, spec)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{module_name!r} has no attribute {attr_path!r} (from MODEL {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return _split_result(obj)
    if not callable(obj):
        raise InputError(f"{spec!r} is neither a callable nor an nn.Module")
    return _split_result(obj())


def _import(module_name: str, spec: str) -> Any:
    """Import a dotted module name, or a ``.py`` file by path; the cwd is importable, as with -m."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InputError(f"no such file {module_name!r} (from MODEL {spec!r})")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise InputError(
                f"cannot import module {module_name!r} (from MODEL {spec!r}): {exc}. Check the "
                f"spelling, or run from the directory that contains it / add it to PYTHONPATH."
            ) from exc
        raise  # the user's module itself failed to import one of its dependencies


# ---------------------------------------------------------------------------------------------
# Flags shared by the sub-commands
# ---------------------------------------------------------------------------------------------

MODEL_HELP = (
    "model to compact: 'package.module:callable' (or 'file.py:callable') returning a model or "
    "(model, example_input); 'zoo:NAME' for a built-in model; or a file written by "
    "torch.save(model). Loading a file runs pickle, which can execute arbitrary code: "
    "only load files you trust."
)


def shape_arg(text: str) -> tuple[int, ...]:
    """``--input-shape``: parse_shape with argparse's error type."""
    try:
        return parse_shape(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_round_to(text: str, extra: tuple[str, ...] = (), flag: str = "--round-to") -> int | str:
    """``--round-to`` (or ``flag``): "auto", a positive int, or one of ``extra`` (e.g. "measured")."""
    if text == "auto" or text in extra:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        choices = ", ".join(repr(c) for c in ("auto", *extra))
        raise argparse.ArgumentTypeError(f"{flag} must be a positive integer or {choices}, got {text!r}")
    return value


def add_structure_args(p: argparse.ArgumentParser) -> None:
    """What may be pruned: shared by every sub-command that analyses a model."""
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="module name to keep whole (repeatable)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="also prune the residual stream (hidden size) of transformers")
    p.add_argument("--attention", choices=tuple(ATTENTION_MODES), default="heads",
                   help="what attention layers lose: whole heads (default), q heads within each "
                        "KV group, or channels inside every head (head_dim)")


def add_importance_arg(p: argparse.ArgumentParser) -> None:
    """``--importance``: the registered criteria that need no calibration data."""
    p.add_argument("--importance", choices=(*weight_only_criteria(), "mask"), default=None,
                   help="unit importance criterion (default l2, or reconstruction when the command "
                        "takes --calib and it is given, as data= does in the API; data-driven "
                        "criteria such as taylor need the Python API); 'mask': remove exactly the "
                        "units the model's torch.nn.utils.prune masks emptied")


def ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value
