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


def _float64_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The definition, computed the slow way (float64 on the CPU; values finite here)."""
    a, e = actual.double(), expected.double()
    diff = (a - e).abs().max().item()
    scale = e.abs().max().item()
    return diff / scale if scale > 0 else diff


def test_relative_error_on_float32_matches_the_float64_definition() -> None:
    from graphprune.reference.tolerance import relative_error

    g = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1e-3, 1.0, 1e30):
        e = torch.randn(64, 33, generator=g) * scale
        for rel in (0.0, 1e-7, 1e-4, 0.5, 3.0):
            a = e + torch.randn(64, 33, generator=g) * scale * rel
            got, want = relative_error(a, e), _float64_error(a, e)
            assert abs(got - want) <= 1e-6 * want + 1e-45, (scale, rel, got, want)
    zero = torch.zeros(5)
    assert relative_error(zero + 0.25, zero) == 0.25  # absolute error where expected is all zero
    big = torch.full((3,), 3e38)
    assert relative_error(big, -big) == _float64_error(big, -big)  # the float32 difference overflows


def test_relative_error_compares_non_finite_values_position_by_position() -> None:
    from graphprune.reference.tolerance import relative_error

    e = torch.tensor([1.0, float("inf"), -float("inf"), 2.0])
    assert relative_error(e.clone(), e) == 0.0  # the same infinities: the finite part is compared
    a = e.clone()
    a[0] = 1.5
    assert relative_error(a, e) == 0.25
    inf = float("inf")
    for bad in (torch.tensor([1.0, 0.0, -inf, 2.0]), torch.tensor([1.0, -inf, inf, 2.0]),
                torch.tensor([1.0, float("nan"), -inf, 2.0])):
        assert relative_error(bad, e) == float("inf")
    nan = torch.tensor([float("nan"), 1.0])
    assert relative_error(nan, nan.clone()) == float("inf")  # a NaN equals nothing, itself included
    assert relative_error(torch.tensor([0.0, 1.0]), nan) == float("inf")
