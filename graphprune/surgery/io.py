"""Saving and loading compact models without pickle: safetensors weights plus the JSON plan.

A compact model is the user's own class at smaller sizes, so it cannot be rebuilt from its
class and config alone: the constructor would make the original sizes. What *can* rebuild it
is the plan, which says exactly which positions of which tensors were removed and which
attributes changed. So a saved directory holds::

    graphprune.json      manifest: format version, model class, versions (for humans and checks)
    plan.json            the Plan (Plan.to_json), replayed by load()
    model.safetensors    the compact model's weights
    buffers.safetensors  its non-persistent buffers (not in a state_dict, still part of the
                         model: a base built with another seed must not supply them)
    config.json          (Hugging Face models) the compact model's ``config``, so the loaded
                         model describes its new widths too (plain JSON values only)

and ``load(directory, base_model)`` replays the plan on a freshly built base model (the same
architecture, any weights) and then loads the weights. Nothing in the directory is executable,
and nothing in it can change the model in a way graphprune would not: the plan is parsed field
by field (``planning.plan_json``) and may only change sizes its slices imply
(``surgery.plan_checks``); the tensor files must hold exactly the model's tensors, at the
plan's shapes, with the same kind of dtype; links are refused; config.json contributes sizes
only. A tampered directory is rejected with a ``PlanMismatchError`` that says what is wrong.

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
from graphprune.graph.copies import eval_copy, keeps_global_rng, private_copy
from graphprune.graph.inputs import flatten_outputs, normalize_inputs
from graphprune.graph.trace import check_model, no_cache
from graphprune.planning.plan import Plan
from graphprune.surgery.depth import remove_blocks
from graphprune.surgery.plan_checks import check_plan_fits, check_size_change, kept_fractions
from graphprune.surgery.rewrite import replay_rewrites
from graphprune.surgery.slicing import replay

FORMAT = "graphprune-saved/1"
MANIFEST = "graphprune.json"
PLAN = "plan.json"
WEIGHTS = "model.safetensors"
BUFFERS = "buffers.safetensors"  # non-persistent buffers (not in the state_dict, still the model's)
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
    from safetensors.torch import save_file, save_model

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
    bad = non_finite_parameters(model)
    if bad:
        raise InputError(
            f"the model holds NaN or Inf in {', '.join(bad[:5])}; it computes nothing that a saved copy "
            "could reproduce. Fix the weights (or the training run that produced them) first."
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / PLAN).write_text(plan.to_json())
    files = {"plan": PLAN, "weights": WEIGHTS}
    extra = non_persistent_buffers(model)
    if extra:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in extra.items()}, str(out / BUFFERS),
                  metadata={"format": FORMAT})
        files["buffers"] = BUFFERS
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


def _apply_config(model: nn.Module, directory: Path, plan: Plan) -> None:
    """Give the loaded model the saved config's *sizes*: nothing else in config.json is taken.

    A key is applied when the base config has it as an integer (or list of integers) and the saved
    value shrinks it by a fraction some sliced dimension keeps (``num_attention_heads`` 12 -> 8), or
    when the base config lacks it and a module of the loaded model holds that very integer under
    that name (``head_dim``, which ``compact`` adds to configs that derive it). Other differences
    (flags, strings, epsilons: how the model computes) keep the base model's values.
    """
    config = getattr(model, "config", None)
    path = _existing(directory, CONFIG)
    if path is None or config is None:
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise PlanMismatchError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(saved, dict):
        raise PlanMismatchError(f"{path} does not hold a config object")
    fractions = kept_fractions(plan, model)
    attrs = {(attr, v) for m in model.modules() for attr, v in vars(m).items() if type(v) is int}
    for key, value in saved.items():
        if not isinstance(key, str) or key.startswith("_") or not _size(value):
            continue
        current = getattr(config, key, None)
        if current is None:
            if type(value) is int and (key, value) in attrs:
                setattr(config, key, value)
            continue
        if not _size(current) or _as_list(current) == _as_list(value):
            continue
        check_size_change("config", key, _as_list(current), _as_list(value), fractions, what=str(path))
        try:
            setattr(config, key, tuple(value) if isinstance(current, tuple) else value)
        except (AttributeError, TypeError, ValueError):
            continue


def _size(v: Any) -> bool:
    if type(v) is int:
        return True
    return isinstance(v, (list, tuple)) and bool(v) and all(type(x) is int for x in v)


def _as_list(v: Any) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of floating-point parameters holding NaN or Inf (buffers may hold -inf masks)."""
    return [
        name for name, p in model.named_parameters()
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all())
    ]


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers registered with ``persistent=False``: not in the state_dict, but part of the model."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, mod in model.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(name)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                out[f"{path}.{name}" if path else name] = t
    return out


def _existing(directory: Path, name: str) -> Path | None:
    """``directory / name`` if it is a regular file; links are refused (save never writes one)."""
    path = directory / name
    if path.is_symlink():
        raise PlanMismatchError(
            f"{path} is a link; graphprune.save writes plain files only, so a linked file is not part "
            "of this save (copy the directory with its files instead)."
        )
    return path if path.is_file() else None


_KINDS = {"F": "floating point", "B": "bool", "I": "integer", "U": "integer", "C": "complex"}


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "floating point" if t.is_floating_point() else "integer"


def _check_tensor_file(path: Path, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Same names, shapes and kinds of dtype as ``tensors`` (safetensors would convert silently)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise PlanMismatchError(f"the saved {what} ({path.name}) cannot be read: {exc}") from exc
    for name, (dtype, shape) in header.items():
        t = tensors.get(name)
        if t is None:
            continue  # unexpected names: load_model's strict check says which
        kind = _KINDS.get(dtype[:1], dtype)
        if kind != _kind(t):
            raise PlanMismatchError(
                f"the saved {what} hold {name} as {dtype} ({kind}) but the model's {name} is "
                f"{t.dtype} ({_kind(t)}); the file was not written for this model."
            )
        if list(shape) != list(t.shape):
            raise PlanMismatchError(
                f"the saved {what} hold {name} of shape {tuple(shape)} but the plan makes it "
                f"{tuple(t.shape)}; the directory's weights and plan do not belong together."
            )


def _load_buffers(small: nn.Module, directory: Path, manifest: dict[str, Any]) -> None:
    """Copy the saved non-persistent buffers in (shape and dtype kind checked), or refuse without them."""
    from safetensors.torch import load_file

    wanted = non_persistent_buffers(small)
    if not wanted:
        return
    path = _existing(directory, BUFFERS)
    if path is None or manifest.get("files", {}).get("buffers") != BUFFERS:
        raise PlanMismatchError(
            f"{directory} holds no values for the model's non-persistent buffers "
            f"({', '.join(sorted(wanted)[:5])}{' ...' if len(wanted) > 5 else ''}); loading would take "
            "them from the base model, which may differ. Save again with this graphprune version."
        )
    _check_tensor_file(path, wanted, "buffers")
    saved = load_file(str(path))
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        raise PlanMismatchError(
            f"the saved buffers do not match the model's non-persistent buffers (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for name, value in saved.items():
            wanted[name].copy_(value)


def _version() -> str:
    from graphprune import __version__

    return __version__


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = _existing(directory, MANIFEST)
    if path is None:
        raise InputError(
            f"{directory} is not a graphprune save directory (no {MANIFEST}); "
            "save with graphprune.save(model, directory, plan)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(manifest, dict) and not isinstance(manifest.get("files", {}), dict):
        raise InputError(f"{path}: 'files' must be an object")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(
            f"{path} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"this graphprune reads {FORMAT!r}"
        )
    return manifest


@keeps_global_rng
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
    Raises ``PlanMismatchError`` when the plan or the weights do not fit ``base_model``, or when
    any file is not what ``save`` writes (see the module docstring).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_model(base_model)
    directory = Path(directory)
    manifest = _read_manifest(directory)
    plan_file = _existing(directory, PLAN)
    if plan_file is None:
        raise InputError(f"{directory} has no {PLAN}")
    try:
        text = plan_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanMismatchError(f"{plan_file} cannot be read as text: {exc}") from exc
    plan = Plan.from_text(text, str(plan_file))  # parsed, never followed as a path
    weights = _existing(directory, WEIGHTS)
    if weights is None:
        raise InputError(f"{directory} has no {WEIGHTS}")
    small = private_copy(base_model)  # keeps base_model's dtype, device and modes
    remove_blocks(small, plan)  # the width plan was made on the shallower model
    check_plan_fits(small, plan)
    replay(small, plan)
    replay_rewrites(small, plan)  # submodules the compaction rewrote as graphs: the same again
    _check_tensor_file(weights, small.state_dict(), "weights")
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
    bad = non_finite_parameters(small)
    if bad:
        raise PlanMismatchError(
            f"the saved weights hold NaN or Inf in {', '.join(bad[:5])}: graphprune.save never writes "
            "such a model, so the file was damaged or altered after saving."
        )
    _load_buffers(small, directory, manifest)
    _apply_config(small, directory, plan)
    if example_input is not None:
        _check_runs(base_model, small, example_input)
    return small


def _check_runs(base_model: nn.Module, small: nn.Module, example_input: Any) -> None:
    def shapes(m: nn.Module) -> list[tuple[int, ...]]:
        m = eval_copy(m)  # neither the caller's base model nor the result is run itself
        args, kwargs = normalize_inputs(example_input)
        with torch.no_grad(), no_cache(m):
            return [tuple(t.shape) for t in flatten_outputs(m(*args, **kwargs))]

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
