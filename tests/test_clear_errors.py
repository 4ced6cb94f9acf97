"""Models graphprune cannot prune as they are get an error that names the module and the fix.

Issue 10, item 5: each of these used to end in a raw Python error (``TypeError: cannot pickle``,
``RuntimeError`` from deepcopy, ``AttributeError: ... 'lifted_tensor_0'``) or in a message that
blamed the wrong thing (an unrelated control-flow hint, "This is a graphprune bug", "check the
calibration data"). One test per class.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import graphprune


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def x() -> torch.Tensor:
    return torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))


def test_attribute_that_cannot_be_copied_is_named() -> None:
    model = net()
    model[2].lock = threading.Lock()
    with pytest.raises(graphprune.InputError) as info:
        graphprune.compact(model, x(), 0.5)
    msg = str(info.value)
    assert "module '2' (Conv2d)" in msg and "'lock'" in msg and "_thread.lock" in msg, msg
    assert "Remove it before pruning" in msg, msg


def test_old_style_weight_norm_says_how_to_remove_it() -> None:
    model = net()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[2])
    with pytest.raises(graphprune.InputError) as info:
        graphprune.compact(model, x(), 0.5)
    msg = str(info.value)
    assert "module '2' (Conv2d)" in msg and "remove_weight_norm" in msg, msg


def test_prune_masks_that_cannot_be_copied_say_how_to_fold_them() -> None:
    from graphprune.graph.copies import private_copy

    model = net()
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", 0.3)  # weight = weight_orig * weight_mask
    with pytest.raises(graphprune.InputError) as info:
        private_copy(model)  # what every entry point copies the model with
    msg = str(info.value)
    assert "module '2' (Conv2d)" in msg and "torch.nn.utils.prune.remove(module, 'weight')" in msg, msg


def test_hook_holding_a_per_channel_tensor_keeps_those_channels() -> None:
    """The hook's tensor is no attribute of any module, so it cannot be sliced: the channels it
    meets are kept (like a model input's), everything else is pruned, and verify checks the result
    against the original program."""
    model = net()
    scale = torch.rand(8, 1, 1)
    model[2].register_forward_hook(lambda mod, args, out: out * scale)
    small, plan = graphprune.compact_with_plan(model, x(), 0.5)
    assert small[2].out_channels == 8, plan  # the channels the hook scales
    assert small[0].out_channels == 4, plan  # the rest is pruned
    assert any("mul.Tensor in 2: reads a tensor of shape [8, 1, 1] from outside the model" in b
               for b in plan.boundaries), plan.boundaries  # and the plan says why


class CachedScale(nn.Module):
    """Eval-mode cache of a tensor derived from a parameter, kept in a dict attribute (as
    EfficientFormer/LeViT cache their attention biases per device)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.scale[:, None, None] * 2
        return y * self.cache["cpu"]


def test_cache_filled_by_an_earlier_forward_is_named_and_keeps_its_channels() -> None:
    """A cache filled before compaction is lifted by torch.export as a constant no module
    attribute holds (used to end in ``AttributeError: ... 'lifted_tensor_0'``): its channels keep
    their size, the plan names the cache to clear, and after clearing it they are pruned."""
    model = net()
    model.insert(3, CachedScale())
    model.eval()
    with torch.no_grad():
        model(x())  # fills the cache
    small, plan = graphprune.compact_with_plan(model, x(), 0.5)
    assert small[2].out_channels == 8, plan
    note = "kept in 3.cache['cpu'] (a cache filled by an earlier forward"
    assert any(note in b for b in plan.boundaries), plan.boundaries
    assert small[0].out_channels == 4, plan  # the rest is pruned (verify=True checked the numbers)
    model[3].cache.clear()
    small = graphprune.compact(model, x(), 0.5)
    assert small[2].out_channels == 4 and small[3].scale.shape == (4,)


class BuiltInForward(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 1.0, 1.0, 1.0])[:, None, None]


def test_tensor_built_in_forward_is_named_as_such_not_as_a_hook() -> None:
    model = net()
    model.insert(3, BuiltInForward())
    small, plan = graphprune.compact_with_plan(model.eval(), x(), 0.5)
    assert small[2].out_channels == 8 and small[0].out_channels == 4, plan
    assert any("builds from Python values (torch.tensor(...)" in b for b in plan.boundaries), plan.boundaries


def test_torchscript_submodule_is_named_as_the_cause() -> None:
    model = net()
    model[2] = torch.jit.script(nn.Conv2d(8, 8, 3))
    with pytest.raises(graphprune.TraceError) as info:
        graphprune.compact(model, x(), 0.5)
    msg = str(info.value)
    assert msg.startswith("torch.export could not trace the model because module '2' is TorchScript"), msg
    assert "control flow" not in msg and "torch.cond" not in msg, msg


class SizeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if y.shape[1] == 8:  # true when traced, false once c1 is pruned
            y = y * 2
        return self.c2(y)


def test_branch_on_a_tensor_size_is_not_called_a_graphprune_bug() -> None:
    torch.manual_seed(0)
    with pytest.raises(graphprune.VerificationError) as info:
        graphprune.compact(SizeBranch(), x(), 0.5)
    msg = str(info.value)
    assert "graphprune bug" not in msg, msg
    assert "branches on a tensor size" in msg and "mul.Tensor in the model's own forward" in msg, msg


def test_non_finite_weight_is_blamed_not_the_calibration_data() -> None:
    model = net()
    with torch.no_grad():
        model[2].weight[1, 0, 0, 0] = float("inf")
    with pytest.raises(graphprune.InputError) as info:
        graphprune.compact(model, x(), 0.5, importance="l1")
    msg = str(info.value)
    assert "calibration" not in msg, msg
    assert "2.weight (1 of 576 values)" in msg and "ignored_layers=['2']" in msg, msg
    small = graphprune.compact(model, x(), 0.5, importance="l1", ignored_layers=["2"])  # the fix works
    assert small[2].weight.shape == model[2].weight.shape



def test_warnings_point_at_the_callers_line() -> None:
    """Warnings name the line that called graphprune, however deep the call (public entry points
    are wrapped to keep the RNG, which shifted every fixed stacklevel into graphprune)."""
    from test_fallback import _net  # a timm-style attention that must be rewritten or kept whole

    model, x = _net()
    with pytest.warns(UserWarning, match="cannot run at the new sizes") as caught:
        graphprune.compact(model, x, 0.5)
    assert {w.filename for w in caught if "graphprune" in str(w.message)} == {__file__}
