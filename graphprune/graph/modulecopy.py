"""``copy.deepcopy`` of an ``nn.Module`` tree, the same copy made without deepcopy's generic path.

Why: every call copies the user's model once (analysis plans on a copy, ``graph.copies``), and
``copy.deepcopy`` spends most of that on Python bookkeeping, not on data: each module's
``__dict__`` holds about ten ordered dicts (parameters, buffers, submodules and eight kinds of
hooks, nearly all empty), each rebuilt through ``__reduce_ex__`` and ``copyreg``. On a
MobileNet that is ~50 ms of a ~0.5 s call; Torch-Pruning's whole call is 0.1-0.3 s.

The result is what ``copy.deepcopy(model, memo)`` returns: modules whose class copies the
default way (no ``__deepcopy__``, ``__reduce_ex__``, ``__getstate__``, ``__slots__`` or
copyreg entry of its own; its ``__setstate__`` runs as deepcopy runs it) are rebuilt here,
their ``__dict__`` entries copied one by one, as are plain dicts and tuples; every other value
goes to ``copy.deepcopy`` with the same ``memo``, so shared objects stay shared, cycles resolve,
and custom copy protocols run as they would.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

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
    return copy.deepcopy(value, memo)
