"""Saving and loading compact models without pickle: safetensors weights plus the JSON plan.

A compact model is the user's own class at smaller sizes, so it cannot be rebuilt from its
class and config alone: the constructor would make the original sizes. What *can* rebuild it
is the plan, which says exactly which positions of which tensors were removed and which
attributes changed. So a saved directory holds::

    graphprune.json      manifest: format version, model class, versions (for humans and checks)
    plan.json            the Plan (Plan.to_json), replayed by load()
    model.safetensors    the compact model's weights
    config.json          (Hugging Face models) the compact model's ``config``, so the loaded
                         model describes its new widths too (plain JSON values only)

and ``load(directory, base_model)`` replays the plan on a freshly built base model (the same
architecture, any weights) and then loads the weights. Nothing in the directory is executable:
JSON and safetensors only, and the plan may only change integer/size attributes that exist on
the base model with the value the plan expects, so a tampered file can at worst be rejected.

``torch.save(small)`` still works for users who prefer it (the compact model is an ordinary
module); ``torch.load`` of such a file unpickles, which is the user's choice, not graphprune's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.errors import InputError, PlanMismatchError
from graphprune.graph.analysis import param_tensor
from graphprune.graph.inputs import flatten_outputs, normalize_inputs
from graphprune.graph.trace import check_model, no_cache
from graphprune.planning.plan import Plan
from graphprune.surgery.slicing import MODULE_ATTRS, plan_tensor, replay

FORMAT = "graphprune-saved/1"
MANIFEST = "graphprune.json"
PLAN = "plan.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _expected_shape(plan: Plan, name: str) -> list[int] | None:
    shape = plan.shapes.get(name)
    if shape is None:
        return None
    new = list(shape)
    for dim, kept in plan.slices.get(name, {}).items():
        if dim < len(new):
            new[dim] = len(kept)
    return new


def _check_model_matches_plan(model: nn.Module, plan: Plan) -> None:
    """The model being saved must be the result of ``plan`` (sliced tensors at the new sizes)."""
    for name in plan.slices:
        try:
            t = param_tensor(model, name)
        except AttributeError as exc:
            raise PlanMismatchError(
                f"the plan slices {name!r} but the model to save has no such tensor: save the compact "
                "model together with the plan that made it."
            ) from exc
        expected = _expected_shape(plan, name)
        if expected is not None and list(t.shape) != expected:
            raise PlanMismatchError(
                f"{name} has shape {tuple(t.shape)} but the plan makes it {tuple(expected)}: this plan "
                "did not make this model. Save the compact model with its own plan "
                "(graphprune.compact_with_plan returns both)."
            )


def save(model: nn.Module, directory: str | Path, plan: Plan) -> Path:
    """Save a compact ``model`` and the ``plan`` that made it to ``directory`` (no pickle).

    Returns the directory. Load it back with ``graphprune.load(directory, base_model)``, where
    ``base_model`` is a freshly built model of the original architecture.
    """
    from safetensors.torch import save_model

    check_model(model)
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, got {type(plan).__name__}")
    if isinstance(model, torch.fx.GraphModule) and any("GraphModule" in n for n in plan.notes):
        raise InputError(
            "this compact model is graphprune's fx GraphModule fallback (its class could not run at the "
            "new sizes), which the plan cannot rebuild from the base model. Save it with "
            "torch.export.save(torch.export.export(model, args), path) instead."
        )
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise InputError("the model is on the meta device: there are no weights to save")
    _check_model_matches_plan(model, plan)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / PLAN).write_text(plan.to_json())
    files = {"plan": PLAN, "weights": WEIGHTS}
    config = _config_dict(model)
    if config is not None:
        (out / CONFIG).write_text(json.dumps(config, indent=1))
        files["config"] = CONFIG
    manifest = {
        "format": FORMAT,
        "model_class": _class_name(model),
        "graphprune_version": _version(),
        "torch_version": torch.__version__,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's Hugging Face-style config as JSON data (plain values only), if it has one."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        data = to_dict()
    except Exception:  # noqa: BLE001 - a config we cannot read is simply not saved
        return None
    return {k: v for k, v in data.items() if _plain(v)}


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


def _apply_config(model: nn.Module, directory: Path) -> None:
    """Give the loaded model the saved config's values (data only: no code, no nested objects)."""
    path = directory / CONFIG
    config = getattr(model, "config", None)
    if not path.is_file() or config is None:
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(saved, dict):
        raise InputError(f"{path} does not hold a config object")
    for key, value in saved.items():
        if not isinstance(key, str) or key.startswith("_") or not _plain(value):
            continue
        current = getattr(config, key, None)
        if callable(current):
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if current != value:
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                continue


def _version() -> str:
    from graphprune import __version__

    return __version__


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{directory} is not a graphprune save directory (no {MANIFEST}); "
            "save with graphprune.save(model, directory, plan)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(
            f"{path} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"this graphprune reads {FORMAT!r}"
        )
    return manifest


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v
    return norm(a) == norm(b)


def _is_size_value(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def check_plan_fits(base_model: nn.Module, plan: Plan) -> None:
    """Raise ``PlanMismatchError`` unless ``plan`` can be replayed on ``base_model`` as it was made.

    Every sliced tensor must exist with the shape the plan was made on, every kept index must be
    in range, and every attribute the plan changes must exist with the value the plan expects
    (and be a size: an int or a tuple of ints, nothing else). Biases the plan adds
    (``plan.biases``, from reconstruction) need only their layer's weight.
    """
    added = {f"{p}.bias" if p else "bias" for p in plan.biases}
    for path in plan.biases:
        plan_tensor(base_model, f"{path}.weight" if path else "weight", "adds a bias next to")
    for name, dims in plan.slices.items():
        if name in added:
            continue  # replay creates it (zeros sized by the weight) before slicing
        t = plan_tensor(base_model, name, "slices")
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
    for entry in plan.scales:
        t = plan_tensor(base_model, str(entry.get("tensor")), "rescales")
        try:
            fits = entry["dim"] < t.dim() and all(0 <= i < t.shape[entry["dim"]] for i in entry["index"])
        except (KeyError, TypeError) as exc:
            raise PlanMismatchError(f"the plan's rescale entry {entry!r:.80} is malformed") from exc
        if not fits:
            raise PlanMismatchError(f"the plan's rescaled rows of {entry['tensor']} do not fit its shape")
    for u in plan.attr_updates:
        try:
            mod = base_model.get_submodule(u.module) if u.module else base_model
        except AttributeError as exc:
            raise PlanMismatchError(
                f"the plan changes {u.module}.{u.attr} but the base model has no module {u.module!r}"
            ) from exc
        if u.attr in MODULE_ATTRS:
            continue  # recomputed from the sliced tensors by replay()
        if not hasattr(mod, u.attr):
            raise PlanMismatchError(
                f"the plan changes {u.module}.{u.attr} but that module has no attribute {u.attr!r}"
            )
        if not (_is_size_value(u.old) and _is_size_value(u.new)):
            raise PlanMismatchError(
                f"the plan sets {u.module}.{u.attr} to {u.new!r}: only integer sizes may be changed"
            )
        current = getattr(mod, u.attr)
        if not _same(current, u.old):
            raise PlanMismatchError(
                f"the plan expects {u.module}.{u.attr} == {u.old!r} in the base model, found "
                f"{current!r}; build the base model with the configuration the plan was made for."
            )


def load(
    directory: str | Path,
    base_model: nn.Module,
    *,
    example_input: Any = None,
) -> nn.Module:
    """Rebuild a compact model saved with ``save``: replay its plan on a copy of ``base_model``.

    ``base_model`` is a freshly built model of the original architecture and configuration (its
    weights do not matter; it is not modified). The saved weights are copied into the rebuilt
    model, which keeps ``base_model``'s dtype, device and train/eval mode. With
    ``example_input`` the result is run once and must give the base model's output shapes.
    Raises ``PlanMismatchError`` when the plan or the weights do not fit ``base_model``.
    """
    import copy

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_model(base_model)
    directory = Path(directory)
    _read_manifest(directory)
    try:
        plan = Plan.from_json((directory / PLAN).read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{directory} has no {PLAN}") from exc
    except (InputError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise PlanMismatchError(f"{directory / PLAN} is not a valid graphprune plan: {exc}") from exc
    check_plan_fits(base_model, plan)
    small = copy.deepcopy(base_model)
    replay(small, plan)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{directory} has no {WEIGHTS}")
    device = next((t.device for t in small.parameters()), torch.device("cpu"))
    try:
        load_model(small, str(weights), strict=True, device=str(device))
    except (RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()
        raise PlanMismatchError(
            "the saved weights do not fit the base model after replaying the plan "
            f"({first[0] if first else type(exc).__name__}{' ...' if len(first) > 1 else ''}); "
            "the directory's weights and plan do not belong to this architecture."
        ) from exc
    _apply_config(small, directory)
    small.train(base_model.training)
    if example_input is not None:
        _check_runs(base_model, small, example_input)
    return small


def _check_runs(base_model: nn.Module, small: nn.Module, example_input: Any) -> None:
    args, kwargs = normalize_inputs(example_input)

    def shapes(m: nn.Module) -> list[tuple[int, ...]]:
        was = m.training
        m.eval()
        try:
            with torch.no_grad(), no_cache(m):
                return [tuple(t.shape) for t in flatten_outputs(m(*args, **kwargs))]
        finally:
            m.train(was)

    try:
        got = shapes(small)
    except Exception as exc:  # noqa: BLE001
        raise PlanMismatchError(
            f"the loaded model does not run on the example input ({type(exc).__name__}: {exc})"
        ) from exc
    expected = shapes(base_model)
    if got != expected:
        raise PlanMismatchError(
            f"the loaded model's output shapes {got} differ from the base model's {expected}"
        )
