"""graphprune: structured pruning that makes PyTorch models physically smaller and measurably faster.

The public API lives here and only here::

    small = graphprune.compact(model, example_input, ratio=0.3)
    graphprune.export_onnx(small, example_input, "small.onnx")
    print(graphprune.benchmark(model, small, example_input))
"""

from __future__ import annotations

from graphprune.analysis import Analysis, Group, Member, analyze
from graphprune.api import apply_plan, compact, compact_with_plan, make_plan
from graphprune.bench import (
    BenchmarkReport,
    LatencyStats,
    benchmark,
    count_flops,
    count_params,
    measure_latency,
)
from graphprune.errors import (
    GraphPruneError,
    InputError,
    PlanMismatchError,
    TraceError,
    VerificationError,
)
from graphprune.io import load, save
from graphprune.onnx_export import ExportResult, export_onnx
from graphprune.plan import Plan
from graphprune.verify import VerifyReport, verify_model

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BenchmarkReport",
    "ExportResult",
    "LatencyStats",
    "benchmark",
    "count_flops",
    "count_params",
    "export_onnx",
    "measure_latency",
    "Group",
    "Member",
    "Plan",
    "analyze",
    "apply_plan",
    "compact",
    "compact_with_plan",
    "make_plan",
    "load",
    "save",
    "verify_model",
    "VerifyReport",
    "GraphPruneError",
    "InputError",
    "PlanMismatchError",
    "TraceError",
    "VerificationError",
    "__version__",
]
