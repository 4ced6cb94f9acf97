"""graphprune: structured pruning that makes PyTorch models physically smaller and measurably faster.

The public API lives here and only here::

    small = graphprune.compact(model, example_input, ratio=0.3)
    graphprune.export_onnx(small, example_input, "small.onnx")
    print(graphprune.benchmark(model, small, example_input))
"""

from __future__ import annotations

from graphprune.errors import (
    GraphPruneError,
    InputError,
    PlanMismatchError,
    TraceError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "GraphPruneError",
    "InputError",
    "PlanMismatchError",
    "TraceError",
    "VerificationError",
    "__version__",
]
