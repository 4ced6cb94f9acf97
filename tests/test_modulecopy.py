"""graph.modulecopy: the same copy ``copy.deepcopy`` makes, object for object.

The oracle is ``copy.deepcopy`` itself: both copies must have the same structure (which objects
are shared, which are new), the same values and the same classes, and neither may share a
mutable object with the original.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from graphprune.graph.copies import shared_copy
from graphprune.graph.modulecopy import module_deepcopy


class Custom(nn.Module):
    """Copies through its own ``__deepcopy__`` (counts the calls)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def __deepcopy__(self, memo: dict) -> Custom:
        Custom.calls += 1
        new = Custom()
        new.lin.load_state_dict(self.lin.state_dict())
        return new


class Stateful(nn.Module):
    """Its own ``__getstate__``: deepcopy goes the generic way, and so must the fast copy."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.cache = [1, 2]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["cache"] = None  # not copied
        return state


class Tricky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = self.a  # one module at two paths
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 4)
        self.head.weight = self.seq[0].weight  # tied weights
        self.register_buffer("steps", torch.zeros(2))
        self.scale = torch.ones(4)  # plain tensor attribute
        self.table = {"conv": self.a, "sizes": (3, 4), "nested": [self.seq, {"k": 1}]}
        self.ordered = OrderedDict(x=torch.arange(3))
        self.shape = (2, (3, [4]))  # a tuple holding a list: copied, not shared
        self.me = [self]  # a cycle back to the model
        self.custom = Custom()
        self.stateful = Stateful()
        self.hook_calls: list[int] = []
        self.a.register_forward_hook(lambda m, i, o: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(x).mean((2, 3)) * self.scale
        return self.head(self.seq(y))


def _objects(model: Any) -> list[Any]:
    """Every object reachable through ``__dict__``/containers, in a fixed order, once each."""
    seen: dict[int, Any] = {}
    order: list[Any] = []

    def walk(obj: Any) -> None:
        if id(obj) in seen or isinstance(obj, (int, float, str, bool, type(None), type)):
            return
        seen[id(obj)] = obj
        order.append(obj)
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif isinstance(obj, nn.Module):
            walk(vars(obj))

    walk(model)
    return order


def _same_copy(a: Any, b: Any, original: Any) -> None:
    oa, ob, oo = _objects(a), _objects(b), _objects(original)
    assert [type(x) for x in oa] == [type(x) for x in ob]
    assert len(oa) == len(ob)
    new_a = [any(x is y for y in oo) for x in oa]
    new_b = [any(x is y for y in oo) for x in ob]
    assert new_a == new_b  # the same objects are shared with the original (atoms, tuples of atoms)
    for x, y in zip(oa, ob, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) and x.dtype == y.dtype
        elif isinstance(x, dict):
            assert list(x) == list(y)


def test_same_objects_as_deepcopy() -> None:
    torch.manual_seed(0)
    model = Tricky().eval()
    before = Custom.calls
    ref = copy.deepcopy(model)
    got = module_deepcopy(model)
    assert Custom.calls - before == 2  # the custom protocol ran in both
    _same_copy(ref, got, model)
    assert got.b is got.a and got.table["conv"] is got.a and got.me[0] is got
    assert got.head.weight is got.seq[0].weight
    assert got.stateful.cache is None  # the class's own __getstate__ ran
    assert got.shape[1][1] is not model.shape[1][1] and got.shape == model.shape
    assert got.a._forward_hooks and got.a._forward_hooks is not model.a._forward_hooks
    for t in [*got.parameters(), *got.buffers(), got.scale]:
        assert all(t is not u for u in [*model.parameters(), *model.buffers(), model.scale])
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), rtol=0, atol=0)
    got.a.weight.data.add_(1)  # the copy is independent
    assert not torch.equal(got.a.weight, model.a.weight)


def test_memo_seeds_are_used() -> None:
    """shared_copy seeds the memo with parameters over the original's memory: no weight copied."""
    model = Tricky()
    del model.custom  # copies itself, memo or not (as under deepcopy)
    work = shared_copy(model)
    for p, q in zip(model.parameters(), work.parameters(), strict=True):
        assert p is not q and p.data_ptr() == q.data_ptr()
    assert work.head.weight is work.seq[0].weight
    assert work.steps.data_ptr() != model.steps.data_ptr()  # buffers are copied


def test_submodule_lookup_matches_get_submodule() -> None:
    """graph.lookup.submodule: the same module as torch's get_submodule, and the same errors."""
    import pytest

    from graphprune.graph.lookup import submodule

    model = Tricky()
    for path, _ in model.named_modules(remove_duplicate=False):
        assert submodule(model, path) is model.get_submodule(path)
    for bad in ("nope", "seq.5", "a.weight", "scale"):
        with pytest.raises(AttributeError) as theirs:
            model.get_submodule(bad)
        with pytest.raises(AttributeError) as ours:
            submodule(model, bad)
        assert str(ours.value) == str(theirs.value)


class Views(nn.Module):
    """Buffers that are views of one storage, a strided one, one needing grad, one with attributes."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(12.0)
        self.register_buffer("whole", base)
        self.register_buffer("part", base[2:8].view(2, 3))  # a view of ``whole``
        self.register_buffer("strided", torch.randn(4, 6).t())  # non-contiguous
        self.register_buffer("ints", torch.arange(5))
        self.grad_needing = torch.zeros(3, requires_grad=True)  # a plain tensor attribute
        tagged = torch.ones(2)
        tagged.note = "kept"  # an attribute in the tensor's __dict__
        self.register_buffer("tagged", tagged)
        self.listed = [self.part, torch.ones(1)]  # the same tensor reached again


def test_tensors_copy_as_deepcopy_copies_them() -> None:
    model = Views()
    ref, got = copy.deepcopy(model), module_deepcopy(model)
    _same_copy(ref, got, model)
    for name in ("whole", "part", "strided", "ints", "tagged", "grad_needing"):
        a, b, orig = getattr(ref, name), getattr(got, name), getattr(model, name)
        assert type(b) is type(a) and b.dtype == a.dtype and b.shape == a.shape
        assert b.stride() == a.stride() and b.storage_offset() == a.storage_offset()
        assert b.requires_grad == a.requires_grad
        assert b.untyped_storage().data_ptr() != orig.untyped_storage().data_ptr()
        assert torch.equal(b, a)
    # views of one storage stay views of one (new) storage, as under deepcopy
    assert got.part.untyped_storage().data_ptr() == got.whole.untyped_storage().data_ptr()
    assert got.listed[0] is got.part and got.tagged.note == "kept"
    got.whole.zero_()
    assert got.part.abs().sum() == 0 and model.part.abs().sum() > 0  # independent of the original
