"""Checks run by ``compact(verify=True)`` before a result is handed back."""

from __future__ import annotations

from typing import Any

from torch import nn

from graphprune.analysis import Analysis
from graphprune.errors import VerificationError
from graphprune.plan import Plan


def verify_compact(analysis: Analysis, plan: Plan, small: nn.Module, example_input: Any) -> None:
    """Output shapes of the compact model must equal the original's."""
    from graphprune.api import _output_shapes

    got = _output_shapes(small, example_input)
    if got != analysis.traced.output_shapes:
        raise VerificationError(
            f"compact model output shapes {got} differ from the original {analysis.traced.output_shapes}"
        )
