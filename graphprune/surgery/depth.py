"""Depth surgery: delete removable blocks (``graphprune.graph.blocks``) from a copy of the model.

A removed block leaves the model's own class and forward working:

* a block that is an element of an ``nn.ModuleList`` / ``nn.Sequential`` is deleted from it and
  the later elements are renumbered (``layers.5`` becomes ``layers.4``); integer attributes of
  the moved modules that hold their old position (an attention's ``layer_idx``, which indexes the
  KV cache) are renumbered with them;
* a block in an ``nn.Sequential`` whose add is followed by its own parameter-free leaf modules
  (ReLU) is replaced in place by an ``nn.Sequential`` of those modules;
* any other block (a named attribute) is replaced by :class:`Skip`, which returns its first input;
* a Hugging Face config is edited so a model built from it has the new depth: integer fields that
  held the container's old length get the new length, and list fields with one entry per element
  (``layer_types``) lose the removed entries. An edit is kept only if a model built from the
  edited config has exactly the compact model's tensors (a list edit is also kept when the config
  class refuses the config without it: ``layer_types`` must match ``num_hidden_layers``).

Every change is plain data (``DepthEntry``), stored in the plan and replayed by ``apply_plan`` /
``graphprune.load`` before the width slices, which were planned on the shallower model.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.errors import PlanMismatchError

_POSITION_WORDS = ("idx", "index")


class Skip(nn.Module):
    """Stands in for a removed block: returns its first input, whatever else the caller passes."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002 - caller's extras
        return x


class Zero(nn.Module):
    """Stands in for a removed branch's last module: zeros like its first tensor input.

    ``leaves == 0`` returns the tensor; otherwise a tuple of ``leaves`` entries, None except the
    zeros at ``at`` (an attention returning ``(output, None)``).
    """

    def __init__(self, at: int = 0, leaves: int = 0) -> None:
        super().__init__()
        self.at, self.leaves = at, leaves

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        zeros = torch.zeros_like(first)
        if not self.leaves:
            return zeros
        return tuple(zeros if i == self.at else None for i in range(self.leaves))


@dataclass
class DepthEntry:
    """One removed block, as replayed: what was there and what replaced it."""

    module: str  # path of the removed module in the model it was removed from
    cls: str  # its class name (checked on replay)
    container: str | None = None
    position: int | None = None
    tail: list[str] = field(default_factory=list)
    score: float | None = None
    params: int = 0  # number of parameter elements removed
    zero: dict[str, Any] | None = None  # a branch: its last module -> Zero(at, leaves)
    skipped: list[str] = field(default_factory=list)  # a branch: modules -> Skip

    @property
    def action(self) -> str:
        if self.zero is not None:
            return f"branch: {self.zero['module']} -> Zero" + "".join(f", {p} -> Skip" for p in self.skipped)
        if self.tail:
            return "replaced by " + ", ".join(self.tail)
        return "deleted" if self.container is not None else "replaced by Skip"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "action": self.action}  # action: for people reading the plan

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DepthEntry:
        return cls(**{k: d[k] for k in ("module", "cls", "container", "position", "tail", "score", "params",
                                                "zero", "skipped")
                      if k in d})


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, last = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), last


def check_entries(model: nn.Module, entries: list[DepthEntry]) -> None:
    """Raise PlanMismatchError unless every entry names a module of the recorded class."""
    for e in entries:
        try:
            mod = model.get_submodule(e.module)
        except AttributeError as exc:
            raise PlanMismatchError(
                f"the plan removes block {e.module!r} but the base model has no such module; build "
                "the base model with the configuration the plan was made for") from exc
        if type(mod).__name__ != e.cls:
            raise PlanMismatchError(
                f"the plan removes block {e.module} of class {e.cls} but the base model's is "
                f"{type(mod).__name__}")


def remove(model: nn.Module, entries: list[DepthEntry]) -> list[str]:
    """Remove ``entries`` from ``model`` in place (a copy); return notes. Later positions first."""
    check_entries(model, entries)
    notes: list[str] = []
    deleted: dict[str, list[int]] = {}
    for e in entries:
        if e.zero is not None:
            for path in e.skipped:
                parent, last = _parent(model, path)
                parent._modules[last] = Skip()
            parent, last = _parent(model, str(e.zero["module"]))
            parent._modules[last] = Zero(int(e.zero.get("at", 0)), int(e.zero.get("leaves", 0)))
        elif e.tail:
            parent, last = _parent(model, e.module)
            kept = [copy.deepcopy(model.get_submodule(t)) for t in e.tail]
            parent._modules[last] = nn.Sequential(*kept)
        elif e.container is not None and e.position is not None:
            deleted.setdefault(e.container, []).append(e.position)
        else:
            parent, last = _parent(model, e.module)
            parent._modules[last] = Skip()
    for container, positions in deleted.items():
        holder = model.get_submodule(container)
        old_len = len(holder)
        for i in sorted(positions, reverse=True):
            del holder[i]
        kept = [i for i in range(old_len) if i not in set(positions)]
        notes.extend(_renumber(holder, kept))
        notes.extend(_update_config(model, container, old_len, sorted(positions)))
    return notes


def _renumber(holder: nn.Module, kept: list[int]) -> list[str]:
    """Integer attributes holding an element's old position (named ``*idx*`` / ``*index*``) follow it."""
    changed = 0
    for new, old in enumerate(kept):
        if new == old:
            continue
        for mod in holder[new].modules():
            for attr, val in list(vars(mod).items()):
                if (type(val) is int and val == old and not attr.startswith("_")
                        and any(w in attr.lower() for w in _POSITION_WORDS)):
                    setattr(mod, attr, new)
                    changed += 1
    return [f"renumbered {changed} layer index attributes"] if changed else []


def _update_config(model: nn.Module, container: str, old_len: int, removed: list[int]) -> list[str]:
    """Hugging Face: make ``model.config`` describe the new depth (see module docstring)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "save_pretrained"):
        return []
    new_len = old_len - len(removed)
    snapshot = copy.deepcopy(config)
    edits: list[str] = []
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    best = _mismatch(model, config, target)
    ints = [k for k, v in vars(config).items()
            if not k.startswith("_") and "token" not in k and type(v) is int and v == old_len]
    for key in ints:  # an integer edit is kept only if it makes the rebuilt model closer
        setattr(config, key, new_len)
        got = _mismatch(model, config, target)
        if got < best:
            best = got
            edits.append(f"{key}: {old_len} -> {new_len}")
        else:
            setattr(config, key, old_len)
    lists = [k for k, v in vars(config).items()
             if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == old_len]
    for key in lists:  # per-layer lists: kept if closer, or if the config is only valid with it
        old = getattr(config, key)
        valid_before = _valid(config)
        setattr(config, key, type(old)(v for i, v in enumerate(old) if i not in set(removed)))
        got = _mismatch(model, config, target)
        if got < best or (got == best and not valid_before and _valid(config)):
            best = got
            edits.append(f"{key}: {old_len} entries -> {new_len}")
        else:
            setattr(config, key, old)
    if best != 0:
        config.__dict__.clear()
        config.__dict__.update(snapshot.__dict__)
        return [f"model.config left unchanged: no edit builds {container} with {new_len} elements; "
                "use graphprune.save / graphprune.load"]
    return [f"model.config updated for depth ({'; '.join(edits)})"] if edits else []


def _valid(config: Any) -> bool:
    """The config class accepts it (what from_pretrained will check)."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 - any refusal means from_pretrained would refuse it too
        return False
    return True


def _mismatch(model: nn.Module, config: Any, target: dict[str, tuple[int, ...]]) -> float:
    """How many tensors a model built from ``config`` (meta device) gets wrong; inf if refused."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model)(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - a config the class refuses is a rejected edit
        return float("inf")
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    both = got.keys() & target.keys()
    return float(len(got.keys() ^ target.keys()) + sum(got[k] != target[k] for k in both))


def remove_blocks(model: nn.Module, plan: Any) -> list[str]:
    """Replay ``plan.depth`` on ``model`` in place (a copy): the first step of replaying a plan."""
    entries = [DepthEntry.from_dict(d) for d in getattr(plan, "depth", [])]
    return remove(model, entries) if entries else []
