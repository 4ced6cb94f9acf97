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


def _small_and_plan():
    import graphprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    return model, x, small, plan


def test_an_error_within_the_floor_passes_without_a_float64_run(monkeypatch) -> None:
    """The float64 run (a forward of a float64 copy) is skipped when no tolerance could fail."""
    import graphprune
    import graphprune.reference.tolerance as tol

    model, x, small, plan = _small_and_plan()
    runs = []
    real = tol.rounding_amplification
    monkeypatch.setattr(tol, "rounding_amplification", lambda *a: runs.append(1) or real(*a))
    report = graphprune.verify_model(model, small, x, plan)
    assert report.errors and max(report.errors) <= tol.TIGHT_FLOOR
    assert report.tolerances == [tol.TIGHT_FLOOR] * len(report.errors)  # held to the floor
    assert runs == []


def test_an_error_above_the_floor_is_still_held_to_the_measured_tolerance(monkeypatch) -> None:
    """A compact model off by 5e-5 (under the blanket 1e-4, above 10x this model's rounding error:
    the kind of bug the tight tolerance exists for) is still caught: the float64 run happens."""
    import pytest

    import graphprune
    import graphprune.reference.tolerance as tol

    model, x, small, plan = _small_and_plan()
    out = small(x)
    with torch.no_grad():  # shift the output by 5e-5 of its scale
        small[-1].bias += 5e-5 * out.abs().max()
    runs = []
    real = tol.rounding_amplification
    monkeypatch.setattr(tol, "rounding_amplification", lambda *a: runs.append(1) or real(*a))
    with pytest.raises(graphprune.VerificationError, match="relative error"):
        graphprune.verify_model(model, small, x, plan)
    assert runs  # the tolerance was measured (localising the mismatch measures it once more)
