"""Bad input gets a graphprune error that names the problem and says what to do.

Every error must be a ``graphprune.GraphPruneError`` (so callers can catch graphprune's errors
as one family) and carry enough in its message to fix the call without reading graphprune's
source: the offending value, and for tracing failures the first line of torch.export's own error
and where in the user's code it happened.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

import graphprune


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class DataDependentNet(TinyConvNet):
    """Python control flow on a tensor value: torch.export cannot trace this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if y.sum() > 0:  # the line the error must point at
            y = torch.relu(y)
        return self.conv2(self.bn(y))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def _entry_points_with_ratio():
    return [
        pytest.param(lambda m, x, r: graphprune.compact(m, x, ratio=r), id="compact"),
        pytest.param(lambda m, x, r: graphprune.make_plan(m, x, ratio=r), id="make_plan"),
    ]


def _entry_points():
    return [
        pytest.param(lambda m, x: graphprune.compact(m, x, ratio=0.3), id="compact"),
        pytest.param(lambda m, x: graphprune.analyze(m, x), id="analyze"),
    ]


@pytest.mark.parametrize("call", _entry_points_with_ratio())
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "abc", True])
def test_ratio_outside_zero_one_is_rejected_with_the_value_and_the_valid_range(call, ratio) -> None:
    with pytest.raises(graphprune.GraphPruneError) as info:
        call(TinyConvNet().eval(), _x(), ratio)
    msg = str(info.value)
    assert "ratio" in msg, msg
    assert repr(ratio) in msg or str(ratio) in msg, f"message does not show the value: {msg}"
    assert re.search(r"\[\s*0(\.0)?\s*,\s*1(\.0)?\s*\)", msg) or "between 0 and 1" in msg, (
        f"message does not state the valid range [0, 1): {msg}"
    )


@pytest.mark.parametrize("call", _entry_points())
@pytest.mark.parametrize(
    "not_a_module",
    [
        pytest.param(lambda x: x, id="function"),
        pytest.param(OrderedDict(w=torch.zeros(1)), id="state_dict"),
        pytest.param("resnet18", id="string"),
    ],
)
def test_model_that_is_not_a_module_is_rejected(call, not_a_module) -> None:
    with pytest.raises(graphprune.GraphPruneError) as info:
        call(not_a_module, _x())
    msg = str(info.value)
    assert "nn.Module" in msg, f"message does not say an nn.Module is expected: {msg}"
    assert type(not_a_module).__name__ in msg, f"message does not name the type given: {msg}"


@pytest.mark.parametrize("call", _entry_points())
def test_example_input_of_unsupported_type_is_rejected(call) -> None:
    with pytest.raises(graphprune.GraphPruneError) as info:
        call(TinyConvNet().eval(), "not a tensor")
    assert "example_input" in str(info.value), str(info.value)


@pytest.mark.parametrize("call", _entry_points())
def test_example_input_the_model_rejects_shows_the_models_own_error(call) -> None:
    model = TinyConvNet().eval()
    bad = torch.randn(2, 4, 8, 8)  # 4 channels, conv1 wants 3
    with pytest.raises(RuntimeError) as own:
        model(bad)
    own_first_line = str(own.value).splitlines()[0]

    with pytest.raises(graphprune.GraphPruneError) as info:
        call(model, bad)
    msg = str(info.value)
    assert "input" in msg.lower(), msg
    assert own_first_line in msg, (
        f"message does not include the model's own error {own_first_line!r}: {msg}"
    )


def _first_line(text: str) -> str:
    """First non-empty line, with unbacked symbol numbers (u0, u12...) normalised."""
    line = next(line for line in text.splitlines() if line.strip())
    return re.sub(r"\bu\d+\b", "u#", line.strip())


@pytest.mark.parametrize("call", _entry_points())
def test_untraceable_model_shows_the_export_error_and_points_at_the_line(call) -> None:
    model, x = DataDependentNet().eval(), _x()
    with pytest.raises(Exception) as export_error:
        torch.export.export(model, (x,), strict=False)
    expected = _first_line(str(export_error.value))

    with pytest.raises(graphprune.TraceError) as info:
        call(model, x)
    msg = str(info.value)
    assert expected in re.sub(r"\bu\d+\b", "u#", msg), (
        f"message does not show the first line of torch.export's error {expected!r}: {msg}"
    )
    assert "test_errors.py" in msg and "y.sum() > 0" in msg, (
        f"message does not point at the offending line of the model's forward: {msg}"
    )


def test_errors_leave_the_model_untouched() -> None:
    """A failed compaction must not have half-modified the user's model."""
    model = DataDependentNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graphprune.GraphPruneError):
        graphprune.compact(model, _x(), ratio=0.3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
