"""graphprune: structured pruning that makes PyTorch models physically smaller and measurably faster.

The public API lives here and only here::

    small = graphprune.compact(model, example_input, ratio=0.3)
    graphprune.export_onnx(small, example_input, "small.onnx")
    print(graphprune.benchmark(model, small, example_input))
"""

from __future__ import annotations

from graphprune import distributed  # torch.distributed helpers, as a namespace
from graphprune.api import apply_plan, compact, compact_with_plan, make_plan
from graphprune.depth import find_blocks
from graphprune.engine import Engine
from graphprune.errors import (
    DistributedError,
    GraphPruneError,
    InputError,
    PlanMismatchError,
    SlowerModelWarning,
    TraceError,
    VerificationError,
)
from graphprune.export.bench import (
    BenchmarkReport,
    LatencyStats,
    benchmark,
    count_flops,
    count_params,
    measure_latency,
)
from graphprune.export.onnx_export import ExportResult, export_onnx
from graphprune.graph.analysis import Analysis, Group, Member, analyze
from graphprune.graph.blocks import Block
from graphprune.methods import unstructured  # classic mask-based methods, as a namespace
from graphprune.methods.recover import recover
from graphprune.methods.sparsity import GroupLasso, bn_l1_penalty
from graphprune.planning.importance import Importance, lamp
from graphprune.planning.plan import Plan
from graphprune.reconstruct import ReconstructOptions, SecondMoments
from graphprune.search.pruner import Pruner
from graphprune.search.sensitivity import SensitivityTable, sensitivity
from graphprune.search.targets import TargetResult, compact_to_target, sweep
from graphprune.surgery.checkpoint import CheckpointResult, compact_checkpoint
from graphprune.surgery.io import load, save
from graphprune.verify import VerifyReport, verify_model

__version__ = "0.1.0"

__all__ = [
    "ReconstructOptions",
    "SecondMoments",
    "Analysis",
    "BenchmarkReport",
    "Block",
    "CheckpointResult",
    "DistributedError",
    "Engine",
    "ExportResult",
    "GraphPruneError",
    "Group",
    "GroupLasso",
    "Importance",
    "InputError",
    "LatencyStats",
    "Member",
    "Plan",
    "PlanMismatchError",
    "Pruner",
    "SensitivityTable",
    "SlowerModelWarning",
    "TargetResult",
    "TraceError",
    "VerificationError",
    "VerifyReport",
    "__version__",
    "analyze",
    "apply_plan",
    "benchmark",
    "bn_l1_penalty",
    "compact",
    "compact_checkpoint",
    "compact_to_target",
    "compact_with_plan",
    "count_flops",
    "count_params",
    "distributed",
    "export_onnx",
    "find_blocks",
    "lamp",
    "load",
    "make_plan",
    "measure_latency",
    "recover",
    "save",
    "sensitivity",
    "sweep",
    "unstructured",
    "verify_model",
]
