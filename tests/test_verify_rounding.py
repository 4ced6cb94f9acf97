"""verify's rounding allowance: measured conditioning, never an excuse for a real mismatch."""

from __future__ import annotations

import torch
from torch import nn

from graphprune.reference.tolerance import rounding_amplification


def test_conditioning_is_tiny_for_a_well_behaved_model_and_absent_for_half_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    noise = rounding_amplification(model, torch.randn(3, 8))
    assert noise is not None and 0 <= noise < 1e-5
    assert rounding_amplification(model.half(), torch.randn(3, 8).half()) is None


def test_conditioning_grows_with_batchnorm_amplification() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(5):
        bn = nn.BatchNorm1d(16)
        bn.running_var.fill_(1e-7)
        layers += [nn.Linear(8 if i == 0 else 16, 16), bn, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 2)).eval()
    well = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    assert rounding_amplification(model, x) > 10 * rounding_amplification(well, x)
