"""``copy.deepcopy`` of an ``nn.Module`` tree, the same copy made without deepcopy's generic path.

Why: every call copies the user's model once (analysis plans on a copy, ``graph.copies``), and
``copy.deepcopy`` spends most of that on Python bookkeeping, not on data: each module's
``__dict__`` holds about ten ordered dicts (parameters, buffers, submodules and eight kinds of
hooks, nearly all empty), each rebuilt through ``__reduce_ex__`` and ``copyreg``. On a
MobileNet that is ~50 ms of a ~0.5 s call; Torch-Pruning's whole call is 0.1-0.3 s.

The result is what ``copy.deepcopy(model, memo)`` returns: modules whose class copies the
default way (no ``__deepcopy__``, ``__reduce_ex__``, ``__getstate__``, ``__slots__`` or
copyreg entry of its own; its ``__setstate__`` runs as deepcopy runs it) are rebuilt here,
their ``__dict__`` entries copied one by one, as are plain dicts, lists, tuples, sets of atoms
and plain dense tensors (buffers: as ``Tensor.__deepcopy__`` copies them); every other value goes to
``copy.deepcopy`` with the same ``memo``, so shared objects stay shared, cycles resolve,
and custom copy protocols run as they would.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

# values deepcopy returns as they are (its atomic types)
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, range)
_plain_classes: dict[type, bool] = {}


def _copies_plainly(cls: type) -> bool:
    """True if ``copy.deepcopy`` would copy an instance of ``cls`` as: a new object, a copy of the
    ``nn.Module.__getstate__`` dict, the class's ``__setstate__`` on it, and nothing else."""
    known = _plain_classes.get(cls)
    if known is not None:
        return known
    plain = cls not in copyreg.dispatch_table and (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and getattr(cls, "__getnewargs_ex__", None) is None
        and getattr(cls, "__getnewargs__", None) is None
        and not any("__slots__" in vars(base) for base in cls.__mro__ if base is not object)
    )
    _plain_classes[cls] = plain
    return plain


def module_deepcopy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """The same as ``copy.deepcopy(model, memo)``, faster on module trees (module docstring)."""
    memo = {} if memo is None else memo
    return _copy(model, memo)


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    cls = type(value)
    if cls in _ATOMIC:
        return value
    found = memo.get(id(value), memo)
    if found is not memo:
        return found
    # the originals below are reachable from the model for the whole copy, so their ids stay
    # theirs (what deepcopy's keep-alive list is for)
    if cls is tuple:
        items = [_copy(v, memo) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        found = memo.get(id(value), memo)  # a cycle through the tuple made it already
        if found is not memo:
            return found
        out_t = tuple(items)
        memo[id(value)] = out_t
        return out_t
    if cls is list:
        out_l: list[Any] = []
        memo[id(value)] = out_l
        out_l.extend(_copy(v, memo) for v in value)
        return out_l
    if (cls is set or cls is frozenset) and all(type(v) in _ATOMIC for v in value):
        out_s = cls(value)  # what deepcopy makes of a set of atoms (``_non_persistent_buffers_set``)
        memo[id(value)] = out_s
        return out_s
    if (cls is OrderedDict or cls is dict) and not getattr(value, "__dict__", None):
        out = cls()
        memo[id(value)] = out
        for k, v in value.items():
            out[_copy(k, memo)] = _copy(v, memo)
        return out
    if isinstance(value, nn.Module) and _copies_plainly(cls):
        module = cls.__new__(cls)
        memo[id(value)] = module
        module.__setstate__({k: _copy(v, memo) for k, v in value.__getstate__().items()})
        return module
    if cls is torch.Tensor and _plain_tensor(value):
        return _tensor_copy(value, memo)
    return copy.deepcopy(value, memo)


def _plain_tensor(t: torch.Tensor) -> bool:
    """A tensor ``Tensor.__deepcopy__`` copies by its common path: a dense leaf on the CPU or a
    GPU, its storage cloned, nothing else (no gradient, no conjugate/negative view bits)."""
    return (t.layout == torch.strided and not t.is_nested and t.is_leaf and t.grad is None
            and not t.is_quantized and t.device.type in ("cpu", "cuda") and not t.is_conj() and not t.is_neg()
            and torch._C._has_storage(t))


def _tensor_copy(t: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    """``Tensor.__deepcopy__``'s common path without its Python detours (a buffer's deepcopy
    was a third of copying a small network). Storages are cloned once and memoised as torch
    memoises them (``memo["torch"]``, by storage), so views of one storage stay views of one
    copy, also across tensors that ``copy.deepcopy`` copies."""
    storages = memo.setdefault("torch", {})
    storage = t.untyped_storage()
    new_storage = storages.get(storage._cdata)
    if new_storage is None:
        new_storage = storages[storage._cdata] = storage.clone()
    with torch.no_grad():
        new = t.new_empty([])
        new.set_(new_storage, t.storage_offset(), t.size(), t.stride())
    if t.requires_grad:
        new.requires_grad_()
    if t.__dict__:
        new.__dict__ = copy.deepcopy(t.__dict__, memo)
    memo[id(t)] = new
    return new
