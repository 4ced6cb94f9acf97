"""compact() on every built-in CNN family and the MLP, each checked by the oracles in oracles.py.

One tiny model per family (graphprune.zoo): plain conv stack, basic and bottleneck residuals,
grouped convs, dense concatenation, inverted residuals with depthwise convs and squeeze-excitation,
chunk + cat + channel shuffle, an encoder-decoder with ConvTranspose and skip concatenations,
and an MLP. Every model gets the generic oracles (``oracles.OracleSuite``).
"""

from __future__ import annotations

import pytest
import torch
from oracles import OracleSuite, check_dead_channels

from graphprune import zoo

FAMILIES = [*zoo.CNN_NAMES, *zoo.MLP_NAMES]
RATIO = 0.3
# A harder ratio on the families whose coupling is most intricate
# (squeeze-excitation, chunk + shuffle, dense concatenation).
HIGH_RATIO = ["mobilenetv3", "shufflenetv2", "densenet"]


@pytest.mark.parametrize("name", FAMILIES)
class TestGenericOracles(OracleSuite):
    build = zoo.build
    ratio = RATIO

    def test_compact_model_runs_on_another_batch_size(self, name: str) -> None:
        c = self.compacted(name)
        x3 = torch.cat([c.example_input, c.example_input[:1]])  # batch 2 -> 3
        with torch.no_grad():
            expected, got = c.model(x3), c.small(x3)
        assert got.shape == expected.shape


@pytest.mark.parametrize("name", HIGH_RATIO)
def test_removing_exactly_dead_channels_at_ratio_half_leaves_outputs_unchanged(name: str) -> None:
    # exact counts here (round_to=1); the generic oracles above run at compact's default "auto"
    check_dead_channels(*zoo.build(name), 0.5, round_to=1)


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
