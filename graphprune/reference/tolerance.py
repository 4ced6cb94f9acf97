"""How close a compact model must come to the reference.

Per-dtype defaults, or for a small float32 model its own rounding error, measured against float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graphprune.graph.inputs import flatten_outputs, normalize_inputs
from graphprune.graph.trace import no_cache

# relative tolerance (max|a - b| / max|b| per output tensor) by output dtype
DEFAULT_RTOL = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


def tolerance(t: torch.Tensor, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    if not t.dtype.is_floating_point:
        return 0.0
    return DEFAULT_RTOL.get(t.dtype, 1e-4)


TIGHT_FLOOR = 2e-6  # float32 outputs of a well-conditioned model agree with float64 to ~1e-7


TIGHT_MAX_PARAMS = 20_000_000  # a float64 copy of larger models costs more than the check is worth


def _tight(original: nn.Module) -> bool:
    """Worth a float64 run to set the tolerance: a small float32 model on the CPU."""
    params = list(original.parameters())
    return (
        bool(params)
        and sum(p.numel() for p in params) <= TIGHT_MAX_PARAMS
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    )


def tight_rtol(original: nn.Module, example_input: Any) -> float | None:
    """10x the model's own float32 rounding error (at least ``TIGHT_FLOOR``) for a small float32
    model; None (the dtype's default) otherwise. Used by verify and by the attribute choice."""
    if not _tight(original):
        return None
    noise = rounding_amplification(original, example_input)
    return None if noise is None else max(TIGHT_FLOOR, 10 * noise)


class LazyTight:
    """``tight_rtol`` measured only when an error needs it: the float64 run costs a forward pass
    of a float64 copy (on CPUs without fast float64 kernels, several times the float32 one).

    The tight tolerance is never below ``TIGHT_FLOOR``, and the dtype default it falls back to is
    above it, so an error within ``TIGHT_FLOOR`` passes whatever the measurement would say: such
    an error is held to ``TIGHT_FLOOR`` (stricter) and the model is not run in float64. A larger
    error gets the measured tolerance, exactly as ``tight_rtol`` gives it. ``original`` must stay
    unchanged until the last ``tolerance`` call.
    """

    def __init__(self, original: nn.Module, example_input: Any) -> None:
        self.original = original
        self.example_input = example_input
        self.applies = _tight(original)
        self.measured = False
        self.noise: float | None = None  # the model's rounding amplification, once measured

    def tolerance(self, err: float) -> float | None:
        """The float32 tolerance ``err`` is held to; None: the dtype's default."""
        if not self.applies:
            return None
        if err <= TIGHT_FLOOR:
            return TIGHT_FLOOR
        noise = self.amplification()
        return None if noise is None else max(TIGHT_FLOOR, 10 * noise)

    def amplification(self) -> float | None:
        """``rounding_amplification`` of the model, run at most once (whatever the model's size:
        a failing check asks for it too, to tell rounding from a wrong plan)."""
        if not self.measured:
            self.noise = rounding_amplification(self.original, self.example_input)
            self.measured = True
        return self.noise


def rounding_amplification(original: nn.Module, example_input: Any) -> float | None:
    """Relative error of the model's float32 outputs against float64: its conditioning.

    Removal changes the summation order inside every pruned layer, so compact and reference
    can only agree to about the model's own float32 rounding error. Returns None when the
    model is not float32 or cannot run in float64.
    """
    import copy

    try:
        if any(p.dtype != torch.float32 for p in original.parameters()):
            return None
        args, kwargs = normalize_inputs(example_input)

        def to64(v: Any) -> Any:
            return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        model64 = copy.deepcopy(original).double().eval()
        with torch.no_grad(), no_cache(original), no_cache(model64):
            out32 = flatten_outputs(copy.deepcopy(original).eval()(*args, **kwargs))
            kwargs64 = {k: to64(v) for k, v in kwargs.items()}
            out64 = flatten_outputs(model64(*[to64(a) for a in args], **kwargs64))
        errs = [relative_error(a.double(), b) for a, b in zip(out32, out64) if a.is_floating_point()]
        return max(errs) if errs else None
    except Exception:  # noqa: BLE001 - no float64 run, no excuse: the mismatch is reported
        return None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (absolute error where ``expected`` is all zero).

    float32 values on the same device are compared as they are: the difference of two close
    float32 numbers is exact, and a large one is off by a relative 6e-8, far below any
    tolerance. Converting both to float64 on the CPU first cost verification as much as a
    block's convolutions (0.1 s of ResNet-50's 0.35 s block-by-block run). Two scalars tell
    whether anything was non-finite (max propagates NaN; an infinite value, or a difference
    that overflows, makes one of them infinite): only then the careful float64 path runs."""
    if (actual.dtype == expected.dtype == torch.float32 and actual.device == expected.device
            and actual.shape == expected.shape and actual.numel()):
        a32, e32 = actual.detach(), expected.detach()
        both = torch.stack([(a32 - e32).abs().max(), e32.abs().max()]).tolist()
        if math.isfinite(both[0]) and math.isfinite(both[1]):
            return both[0] / both[1] if both[1] > 0 else both[0]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(e).all() or not torch.isfinite(a).all():
        same = torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(
            a[~torch.isfinite(a)], e[~torch.isfinite(e)]
        )
        if not same:
            return math.inf
        fin = torch.isfinite(e)
        a, e = a[fin], e[fin]
        if a.numel() == 0:
            return 0.0
    diff = (a - e).abs().max().item()
    scale = e.abs().max().item()
    return diff / scale if scale > 0 else diff
