"""compact() on every built-in CNN family and the MLP, each checked by the oracles in oracles.py.

One tiny model per family (graphprune.zoo): plain conv stack, basic and bottleneck residuals,
grouped convs, dense concatenation, inverted residuals with depthwise convs and squeeze-excitation,
chunk + cat + channel shuffle, an encoder-decoder with ConvTranspose and skip concatenations,
and an MLP.
"""

from __future__ import annotations

import pytest
import torch
from oracles import (
    assert_untouched,
    check_dead_channels,
    check_onnx,
    check_ratio_zero_identity,
    check_shape_params_flops,
)

from graphprune import zoo

FAMILIES = [*zoo.CNN_NAMES, *zoo.MLP_NAMES]
RATIO = 0.3
# A harder ratio on the families whose coupling is most intricate
# (squeeze-excitation, chunk + shuffle, dense concatenation).
HIGH_RATIO = ["mobilenetv3", "shufflenetv2", "densenet"]


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_zero_gives_bit_identical_outputs(name: str) -> None:
    model, x = zoo.build(name)
    check_ratio_zero_identity(model, x)


@pytest.mark.parametrize(
    ("name", "ratio"), [(n, RATIO) for n in FAMILIES] + [(n, 0.5) for n in HIGH_RATIO]
)
def test_removing_exactly_dead_channels_leaves_outputs_unchanged(name: str, ratio: float) -> None:
    model, x = zoo.build(name)
    check_dead_channels(model, x, ratio)


@pytest.mark.parametrize("name", FAMILIES)
def test_input_model_is_bit_identical_after_compact(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    assert_untouched(c.model, c.before)


@pytest.mark.parametrize("name", FAMILIES)
def test_compact_keeps_output_shapes_and_cuts_params_and_flops(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    check_shape_params_flops(c.model, c.small, c.example_input)


@pytest.mark.parametrize("name", FAMILIES)
def test_compact_model_is_the_users_class_and_runs_on_another_batch_size(
    name: str, compacted
) -> None:
    c = compacted(name, RATIO)
    assert type(c.small) is type(c.model), (
        f"compact returned {type(c.small).__name__}, expected the user's {type(c.model).__name__}"
    )
    x3 = torch.cat([c.example_input, c.example_input[:1]])  # batch 2 -> 3
    with torch.no_grad():
        expected, got = c.model(x3), c.small(x3)
    assert got.shape == expected.shape


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_matches_compact_model_in_onnxruntime(name: str, compacted) -> None:
    c = compacted(name, RATIO)
    check_onnx(c.small, c.example_input)


def test_zoo_models_are_deterministic_and_leave_the_global_rng_alone() -> None:
    """Tests compare runs of the same zoo model, so build() must give the same weights every time."""
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    (a, xa), (b, xb) = zoo.build("resnet18"), zoo.build("resnet18")
    assert torch.equal(torch.rand(1), expected_next), "zoo.build consumed the caller's RNG"
    assert torch.equal(xa, xb)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    bn = a.layers[0][0].bn1
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var)), "BN stats left at default"
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight)), "BN scale left at default"
    assert not a.training
