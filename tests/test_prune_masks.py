"""torch.nn.utils.prune masks become a smaller model: compact(model, x, importance="mask").

Oracles: the units removed are exactly those an independent reading of the masks says are
emptied; with fully dead masked units the compact model's outputs equal the masked model's;
the masked input model is bit-identical afterwards (masks, hooks and all); other criteria see
the effective (masked) weights, so they agree with the same criterion on a prune.remove'd copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import graphprune

X = torch.randn(2, 3, 10, 10)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.conv3 = nn.Conv2d(10, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.head(h.mean((2, 3)))


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model: nn.Module) -> list:
    return [(n, type(h).__name__) for n, m in model.named_modules() for h in m._forward_pre_hooks.values()]


def _dead_mask_model() -> tuple[nn.Module, list[int], list[int]]:
    """conv2's channels 1, 4, 7 masked in weight and bias (fully dead after ReLU), conv1 ln_structured."""
    torch.manual_seed(0)
    model = Net().eval()
    prune.ln_structured(model.conv1, "weight", amount=0.25, n=2, dim=0)
    dead2 = [1, 4, 7]
    w = torch.ones_like(model.conv2.weight)
    b = torch.ones_like(model.conv2.bias)
    w[dead2] = 0
    b[dead2] = 0
    prune.custom_from_mask(model.conv2, "weight", w)
    prune.custom_from_mask(model.conv2, "bias", b)
    prune.l1_unstructured(model.conv3, "weight", amount=0.4)  # unstructured: folded only
    dead1 = sorted(int(c) for c in torch.nonzero(model.conv1.weight_mask.flatten(1).sum(1) == 0))
    return model, dead1, dead2


def test_mask_importance_removes_exactly_the_emptied_units_and_keeps_the_masked_outputs() -> None:
    model, dead1, dead2 = _dead_mask_model()
    before, hooks_before = _state(model), _hooks(model)
    with torch.no_grad():
        expected = model(X)
    small = graphprune.compact(model, X, importance="mask")
    assert small.conv1.out_channels == 12 - len(dead1) and len(dead1) == 3
    assert small.conv2.out_channels == 10 - len(dead2)
    assert small.conv3.out_channels == 8  # l1_unstructured empties no whole channel
    names = [n for n, _ in small.named_parameters()] + [n for n, _ in small.named_buffers()]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert _hooks(small) == []
    # conv2's removed channels were dead: its part of the output is unchanged; conv1's had a live
    # BN shift, so compare against the masked model with those channels' BN shift removed too
    reference = _dead_mask_model()[0]  # an identical masked model (deepcopy refuses masked ones)
    with torch.no_grad():
        reference.bn1.bias[dead1] = 0
        reference.bn1.running_mean[dead1] = 0
        reference.bn1.weight[dead1] = 0
        want = reference(X)
        got = small(X)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, want)  # the BN-shift channels did matter: the test can fail
    after = _state(model)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert _hooks(model) == hooks_before


def test_ratio_is_an_upper_bound_on_masked_removal() -> None:
    model, dead1, dead2 = _dead_mask_model()
    small = graphprune.compact(model, X, importance="mask", ratio=0.1)  # round(0.1 * 12) = 1
    assert small.conv1.out_channels == 11 and small.conv2.out_channels == 9


def test_residual_channel_goes_only_when_every_writer_masks_it() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1, bias=False)
            self.b = nn.Conv2d(3, 6, 1, bias=False)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    model = Res()
    ma = torch.ones_like(model.a.weight)
    ma[[0, 2, 3]] = 0
    mb = torch.ones_like(model.b.weight)
    mb[[2, 3, 5]] = 0
    prune.custom_from_mask(model.a, "weight", ma)
    prune.custom_from_mask(model.b, "weight", mb)
    with torch.no_grad():
        expected = model(X)
    small = graphprune.compact(model, X, importance="mask")
    assert small.a.out_channels == 4  # channels 2 and 3: masked in both writers
    with torch.no_grad():
        torch.testing.assert_close(small(X), expected, rtol=1e-5, atol=1e-6)


def test_global_unstructured_masks_fold_and_empty_consumer_columns_go() -> None:
    torch.manual_seed(1)
    model = Net().eval()
    prune.global_unstructured(
        [(model.conv2, "weight"), (model.conv3, "weight")], pruning_method=prune.L1Unstructured, amount=0.3
    )
    m = torch.ones_like(model.conv3.weight)
    m[:, [0, 9]] = 0  # nothing reads conv2's channels 0 and 9
    prune.custom_from_mask(model.conv3, "weight", m)
    with torch.no_grad():
        expected = model(X)
    small = graphprune.compact(model, X, importance="mask")
    assert small.conv2.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(small(X), expected, rtol=1e-5, atol=1e-6)


def test_other_criteria_see_the_effective_weights() -> None:
    model, _, _ = _dead_mask_model()
    folded = _dead_mask_model()[0]
    for mod, name in [(folded.conv1, "weight"), (folded.conv2, "weight"), (folded.conv2, "bias"),
                      (folded.conv3, "weight")]:
        prune.remove(mod, name)
    for importance in ("l2", "fpgm"):
        a = graphprune.make_plan(model, X, ratio=0.3, importance=importance)
        b = graphprune.make_plan(folded, X, ratio=0.3, importance=importance)
        assert a.slices == b.slices


def test_mask_importance_without_masks_is_a_clear_error() -> None:
    with pytest.raises(graphprune.InputError, match="torch.nn.utils.prune"):
        graphprune.compact(Net(), X, importance="mask")
