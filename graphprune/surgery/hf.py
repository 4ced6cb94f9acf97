"""Hugging Face specifics: keep ``model.config`` describing the compact model.

A compact Hugging Face model is still, say, a ``LlamaForCausalLM``; ``save_pretrained`` writes its
weights and its ``config``, and ``from_pretrained`` rebuilds the model *from the config* before
loading the weights. So the config must give the new sizes (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``head_dim``, ``hidden_size``, and each family's
spelling of them: ``n_head``, ``encoder_ffn_dim``, ``hidden_dim``...).

No table of field names per architecture: the config is *searched*. Every integer field whose
value is an old size (or an old count of equal-width units, e.g. heads) that changed gets the new
values as candidates; a candidate is kept when a model built from the edited config (on the meta
device: no memory, no weights) matches the compact model better, tensor shapes first, then the
integer attributes of its modules (``head_dim`` vs ``num_heads`` can give the same shapes).
An edited config is accepted only if it matches exactly and a model built from it, holding the
compact model's tensors, gives the compact model's outputs. Otherwise the widths are not uniform
across layers, or the architecture derives one width from another (BERT: head size = hidden size /
heads), and the config is left as it was: ``graphprune.save`` / ``graphprune.load`` store such
models (weights plus plan).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from graphprune.graph.inputs import flatten_outputs, normalize_inputs

_INF = (math.inf, math.inf)
_MAX_BUILDS = 200  # meta-device model builds one config search may spend
# and seconds: at least _MIN_SECONDS, or _BUILDS_AT_LEAST builds of this model. The configs the
# tests' models end with needed 6-20 builds; an EfficientNet-B7 build takes 0.15 s, and 200 of
# them were 30 s of a 44 s call for a config no edit describes.
_MIN_SECONDS, _BUILDS_AT_LEAST = 2.0, 30
Field = tuple[str, int | None]  # (config attribute, index into a list-valued attribute or None)


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (duck-typed: transformers stays an optional dependency)."""
    config = getattr(model, "config", None)
    return hasattr(model, "save_pretrained") and hasattr(config, "to_dict") and hasattr(config, "model_type")


def _int_attrs(model: nn.Module) -> dict[tuple[str, str], int]:
    return {
        (path, attr): val
        for path, mod in model.named_modules()
        for attr, val in vars(mod).items()
        if not attr.startswith("_") and type(val) is int
    }


def _signature(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[tuple[str, str], int]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, _int_attrs(model)


def _same_constants(small: nn.Module, config: Any, plan: Any) -> bool:
    """Without values to compare (meta), the next best check of an edited config: a model built
    from it holds every attribute the plan changed at its new value (``head_dim`` 16 -> 8 must not
    come back as 2 heads of 16) and the same float attributes (attention scales) as ``small``."""
    fresh = _build(small, config)
    if fresh is None:
        return False
    modules = dict(fresh.named_modules())
    for u in plan.attr_updates:
        mod = modules.get(u.module)
        if mod is not None and type(u.new) is int and getattr(mod, u.attr, u.new) != u.new:
            return False
    theirs = {(p, a): v for p, m in modules.items() for a, v in vars(m).items() if type(v) is float}
    return all(theirs.get((p, a), v) == v
               for p, m in small.named_modules() for a, v in vars(m).items() if type(v) is float)


def _build(model: nn.Module, config: Any) -> nn.Module | None:
    """``type(model)(config)`` on the meta device; None if the config is refused."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config)
    except Exception:  # noqa: BLE001 - an inconsistent candidate config is just a rejected candidate
        return None


def _score(model: nn.Module, config: Any, target) -> tuple[float, float]:
    fresh = _build(model, config)
    if fresh is None:
        return _INF
    shapes, attrs = _signature(fresh)
    t_shapes, t_attrs = target
    if shapes.keys() != t_shapes.keys():
        return _INF
    bad_shapes = sum(shapes[k] != t_shapes[k] for k in shapes)
    bad_attrs = sum(attrs[k] != v for k, v in t_attrs.items() if k in attrs)
    return (float(bad_shapes), float(bad_attrs))


def _fields(config: Any) -> Iterator[tuple[Field, int]]:
    for key, val in vars(config).items():
        if key.startswith("_") or "token" in key:
            continue
        if type(val) in (int, float) and val > 0:
            yield (key, None), val
        elif isinstance(val, (list, tuple)) and val and all(type(v) is int and v > 0 for v in val):
            for i, v in enumerate(val):
                yield (key, i), v


def _get(config: Any, field: Field) -> int:
    key, i = field
    val = getattr(config, key)
    return val if i is None else val[i]


def _set(config: Any, field: Field, value: int) -> None:
    key, i = field
    if i is None:
        setattr(config, key, value)
    else:
        seq = list(getattr(config, key))
        seq[i] = value
        setattr(config, key, type(getattr(config, key))(seq))


def _transitions(plan: Any, small: nn.Module) -> set[tuple[int, int]]:
    """(old, new) sizes that changed: sliced tensor dims and updated integer attributes."""
    out: set[tuple[int, int]] = set()
    tensors = dict(small.named_parameters(remove_duplicate=False))
    tensors.update(dict(small.named_buffers(remove_duplicate=False)))
    for name, old_shape in plan.shapes.items():
        t = tensors.get(name)
        if t is None:
            continue
        for old, new in zip(old_shape, t.shape, strict=False):
            if old != new:
                out.add((int(old), int(new)))
    for u in plan.attr_updates:
        if type(u.old) is int and type(u.new) is int and u.old != u.new:
            out.add((u.old, u.new))
    return out


def _candidates(value: float, transitions: set[tuple[int, int]], ints: set[int]) -> list[float]:
    """New values a config field holding ``value`` could take: a changed size, or a unit count.

    A float field may be a width ratio (``mlp_ratio``: intermediate = int(hidden * ratio)); its
    candidates make ``int(h * ratio)`` the new width for an integer ``h`` of the config.
    """
    cands: set[float] = set()
    if type(value) is float:
        for old, new in transitions:
            for h in ints:
                if h > 1 and int(h * value) == old:
                    cands.update({new / h, (new + 0.5) / h})
        return sorted(cands)
    for old, new in transitions:
        if old == value:
            cands.add(new)
        elif value > 1 and old % value == 0 and old // value > 1 and new % (old // value) == 0:
            cands.add(new // (old // value))  # ``value`` units of width old/value: now new/width
    cands.discard(value)
    return sorted(cands)


def _inject_head_dim(small: nn.Module, config: Any) -> bool:
    """Give ``config`` an explicit ``head_dim`` when it has none (Qwen2, Phi...).

    Many architectures read ``getattr(config, "head_dim", hidden_size // num_attention_heads)``:
    without the field, fewer heads would mean wider heads. With the field set to the width the
    modules use, the head count can change alone. Returns True if the field was added.
    """
    if "head_dim" in vars(config):
        return False
    widths = [v for (_, attr), v in _int_attrs(small).items() if attr == "head_dim"]
    if not widths:
        return False
    config.head_dim = max(set(widths), key=widths.count)
    return True


def _refused_by_validators(config: Any) -> str | None:
    """The config class's own checks, which ``save_pretrained`` runs (LLaMA: hidden % heads == 0)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # noqa: BLE001 - any refusal means save_pretrained would fail too
        cause = exc.__cause__ or exc
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return None


def _assign_tensors(fresh: nn.Module, small: nn.Module) -> None:
    """Make ``fresh`` (meta) hold ``small``'s tensors (shared, not copied)."""
    named = [*small.named_parameters(remove_duplicate=False), *small.named_buffers(remove_duplicate=False)]
    for name, t in named:
        path, _, attr = name.rpartition(".")
        mod = fresh.get_submodule(path) if path else fresh
        if attr in mod._parameters:
            mod._parameters[attr] = t
        elif attr in mod._buffers:
            mod._buffers[attr] = t


def _outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    from graphprune.graph.trace import no_cache

    args, kwargs = normalize_inputs(example_input)
    with torch.no_grad(), no_cache(model):
        return flatten_outputs(model(*args, **kwargs))


def _same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
                                    for x, y in zip(a, b, strict=True))


def _rebuilds(small: nn.Module, config: Any, example_input: Any, expected: list[torch.Tensor]) -> bool:
    """A model built from ``config`` holding ``small``'s tensors computes ``expected`` (what
    ``small`` computes: the caller ran it already)."""
    fresh = _build(small, config)
    if fresh is None:
        return False
    _assign_tensors(fresh, small)
    if any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()]):
        return False
    fresh.eval()
    try:
        return _same_outputs(_outputs(fresh, example_input), expected)
    except Exception:  # noqa: BLE001 - a config that builds a model which cannot run is rejected
        return False


def update_config(
    small: nn.Module, plan: Any, example_input: Any = None, shapes_only: bool = False
) -> list[str]:
    """Edit ``small.config`` in place so it describes ``small``; return notes for the plan.

    The config object of the compact model is its own (``compact`` works on a deep copy), and its
    submodules that keep a reference to it see the edit. Nothing changes when no consistent edit
    exists; the note then says why and what to use instead. Never raises: the compact model is
    valid whatever happens to its config. Meta models are skipped unless ``shapes_only`` (a
    compacted checkpoint: the search matches shapes and attributes; outputs cannot be compared).
    """
    meta = any(p.is_meta for p in small.parameters())
    if not is_hf_model(small) or (meta and not shapes_only):
        return []  # meta twins (size searches) have no outputs to check and need no config
    if meta:
        example_input = None  # no values: _update_config compares float attributes instead
    snapshot = copy.deepcopy(small.config)
    try:
        return _update_config(small, plan, example_input)
    except Exception as exc:  # noqa: BLE001 - a config we cannot edit must not lose the compact model
        small.config.__dict__.clear()
        small.config.__dict__.update(snapshot.__dict__)
        return [f"model.config left unchanged ({type(exc).__name__}: {exc}); use graphprune.save / load"]


def _update_config(small: nn.Module, plan: Any, example_input: Any) -> list[str]:
    config = small.config
    transitions = _transitions(plan, small)
    if not transitions:
        return []
    target = _signature(small)
    start = time.perf_counter()
    best = _score(small, config, target)
    if best == (0.0, 0.0):
        return []
    deadline = time.perf_counter() + max(_MIN_SECONDS, _BUILDS_AT_LEAST * (time.perf_counter() - start))
    cur = copy.deepcopy(config)
    injected = _inject_head_dim(small, cur)
    ints = {v for _, v in _fields(cur) if type(v) is int}
    fields = [(f, _candidates(v, transitions, ints)) for f, v in _fields(cur)]
    fields = [(f, c) for f, c in fields if c]
    budget = _MAX_BUILDS
    stopped = ""
    for _ in range(4):  # coordinate descent; each pass tries every candidate of every field
        improved = False
        for field, cands in fields:
            old = _get(cur, field)
            for c in cands:
                budget -= 1
                if budget < 0 or time.perf_counter() > deadline:
                    stopped = " (the search spent its budget of builds)" if budget < 0 else \
                        f" (the search stopped after {time.perf_counter() - start:.0f} s)"
                    break
                try:
                    _set(cur, field, c)
                except Exception:  # noqa: BLE001 - typed configs refuse some values (int field, float)
                    continue
                s = _score(small, cur, target)
                if s < best:
                    best, old, improved = s, c, True
                else:
                    _set(cur, field, old)
            if best == (0.0, 0.0):
                break
        if best == (0.0, 0.0) or not improved:
            break
    if injected and best == (0.0, 0.0):
        trial = copy.deepcopy(cur)
        delattr(trial, "head_dim")
        if _score(small, trial, target) == best:
            cur, injected = trial, False
    present = [f for f, _ in fields if f[0] in vars(config) and f[0] in vars(cur)]
    changed = {f: (_get(config, f), _get(cur, f)) for f in present if _get(config, f) != _get(cur, f)}
    if injected:
        changed[("head_dim", None)] = (None, cur.head_dim)
    if best[0] != 0 or not changed:
        return [
            f"model.config left unchanged: no edit of {type(config).__name__} describes the compact "
            f"widths (not uniform across layers, or derived from each other){stopped}; save with "
            "graphprune.save and reload with graphprune.load instead of save_pretrained"
        ]
    refused = _refused_by_validators(cur)
    if refused:
        return [
            f"model.config left unchanged: {type(config).__name__} refuses the edit {changed} ({refused}); "
            "save with graphprune.save and reload with graphprune.load instead of save_pretrained"
        ]
    before = _outputs(small, example_input) if example_input is not None else None
    if before is not None and not _rebuilds(small, cur, example_input, before):
        return [f"model.config left unchanged: a model rebuilt from the edited config {changed} "
                "does not reproduce the compact model; use graphprune.save / graphprune.load"]
    if example_input is None and not _same_constants(small, cur, plan):
        return [f"model.config left unchanged: a model rebuilt from the edited config {changed} "
                "would hold other constants (head sizes, attention scales) than the compact model"]
    for field in changed:
        _set(config, field, _get(cur, field))
    if before is not None and not _same_outputs(_outputs(small, example_input), before):
        for field, (old, _) in changed.items():
            if old is None:
                delattr(config, field[0])
            else:
                _set(config, field, old)
        return ["model.config left unchanged: the model reads the edited fields at run time"]
    shown = ", ".join(f"{k}{'' if i is None else f'[{i}]'}: {o} -> {n}" for (k, i), (o, n) in changed.items())
    return [f"model.config updated ({shown}); save_pretrained/from_pretrained round-trip"]
