"""Size, FLOPs and onnxruntime latency of a model before and after pruning.

Why this module exists: "30 % of the channels removed" says little; what a user needs is whether
the compact model is smaller and *faster* where it will run. So :func:`benchmark` exports both
models to ONNX (verified against torch by :func:`graphprune.export.onnx_export.export_onnx`) and times them
in onnxruntime in the same process, interleaved run by run, so that a change in machine load hits
both alike. FLOPs are reported as a proxy and as the *ideal* speed-up the latency is judged against.

Conventions:

* **FLOPs** are what ``torch.utils.flop_counter.FlopCounterMode`` counts: 2 x multiply-accumulates
  of matmul / linear / conv / attention ops (one multiply + one add each). Elementwise ops,
  normalisation, activations and bias adds are not counted. ``nn.Linear(i, o)`` on a batch of ``B``
  is therefore ``2*B*i*o`` FLOPs.
* **Params** count each parameter tensor once, so tied weights (an LM head sharing the embedding)
  are counted once.
* **Latency** is wall-clock per ``session.run`` in milliseconds, on onnxruntime's CPU provider.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.export.onnx_export import ExportResult, export_onnx, onnx_feed, onnx_session
from graphprune.graph.inputs import eval_mode, run_model

__all__ = [
    "BenchmarkReport",
    "LatencyStats",
    "benchmark",
    "count_flops",
    "count_params",
    "default_threads",
    "layer_widths",
    "measure_latency",
]


# --------------------------------------------------------------------------------------------------
# Static counts


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each distinct tensor counted once (tied weights once).

    Two ``Parameter`` objects that share storage (same data pointer, shape and strides) are also
    counted once: some libraries tie weights that way instead of reusing the object.
    """
    seen: set[Any] = set()
    total = 0
    for p in model.parameters():  # already skips repeated Parameter objects
        key: Any
        if p.device.type == "meta" or p.numel() == 0:
            key = id(p)
        else:
            key = (p.device, p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward pass on ``example_input``, as counted by ``FlopCounterMode``.

    That is 2 x MACs of matmul/linear/conv/attention ops (see the module docstring); the model is
    run in eval mode under ``torch.no_grad`` and its training flags are restored afterwards.
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), counter:
        run_model(model, example_input)
    return int(counter.get_total_flops())


# Layer kinds whose width (weight shape) tells what pruning did to a network.
_WIDTH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)
# Classes from other libraries recognised by name (HF's GPT-2 Conv1D, LlamaRMSNorm, ...).
_WIDTH_NAME_SUFFIXES = ("Norm", "Conv1D", "Linear", "Embedding")


def layer_widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{module name: weight shape}`` for every conv / linear / norm / embedding layer.

    Layers without a weight tensor (e.g. ``LayerNorm(elementwise_affine=False)``) are skipped.
    """
    widths: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, _WIDTH_TYPES) or type(module).__name__.endswith(_WIDTH_NAME_SUFFIXES)):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            widths[name or "<root>"] = tuple(int(d) for d in weight.shape)
    return widths


# --------------------------------------------------------------------------------------------------
# Latency


def default_threads() -> int:
    """CPU cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class LatencyStats:
    """Per-run latency of an onnxruntime session, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    threads: int

    @classmethod
    def from_samples(cls, samples_s: Sequence[float], threads: int) -> LatencyStats:
        if not samples_s:
            raise ValueError("no latency samples")
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p10_ms=float(np.percentile(ms, 10)),
            p90_ms=float(np.percentile(ms, 90)),
            min_ms=float(ms.min()),
            mean_ms=float(ms.mean()),
            runs=int(ms.size),
            threads=threads,
        )

    def __str__(self) -> str:
        return (
            f"median {self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, "
            f"min {self.min_ms:.3f}; {self.runs} runs, {self.threads} threads)"
        )


def _check_counts(warmup: int, runs: int) -> None:
    if warmup < 0 or runs < 1:
        raise ValueError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")


def measure_latency(
    onnx_path: str | os.PathLike,
    example_input: Any,
    *,
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = None,
) -> LatencyStats:
    """Time ``runs`` onnxruntime inferences of ``onnx_path`` on ``example_input`` (after ``warmup``).

    ``threads`` is onnxruntime's intra-op thread count; default: every core this process may use.
    """
    _check_counts(warmup, runs)
    threads = threads or default_threads()
    session = onnx_session(onnx_path, threads=threads)
    feed = onnx_feed(session, example_input)
    for _ in range(warmup):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - t0)
    return LatencyStats.from_samples(samples, threads)


def interleaved_latency(
    paths: Sequence[Path], example_input: Any, *, warmup: int, runs: int, threads: int
) -> list[LatencyStats]:
    """Time several ONNX models in turns (A B, B A, A B, ...) so drift in load hits all alike."""
    sessions = [onnx_session(p, threads=threads) for p in paths]
    feeds = [onnx_feed(s, example_input) for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    samples: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for _ in range(runs):
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            samples[i].append(time.perf_counter() - t0)
        order.reverse()  # alternate who goes first: neither model always runs on a warm cache
    return [LatencyStats.from_samples(s, threads) for s in samples]


# --------------------------------------------------------------------------------------------------
# The report


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


@dataclass
class BenchmarkReport:
    """Before/after comparison of an original model and its compact version.

    ``speedup`` = original median latency / compact median latency; ``ideal_speedup`` = original
    FLOPs / compact FLOPs; ``efficiency`` = speedup / ideal_speedup (1.0: latency fell exactly as
    much as FLOPs did). Ratios are ``None`` where a denominator is zero.
    """

    original_params: int
    compact_params: int
    original_flops: int
    compact_flops: int
    original_latency: LatencyStats
    compact_latency: LatencyStats
    speedup: float
    ideal_speedup: float | None
    efficiency: float | None
    original_exporter: str
    compact_exporter: str
    widths_before: dict[str, tuple[int, ...]] = field(default_factory=dict)
    widths_after: dict[str, tuple[int, ...]] = field(default_factory=dict)
    original_onnx: str | None = None  # paths are kept only when a workdir was given
    compact_onnx: str | None = None

    @property
    def param_ratio(self) -> float | None:
        """compact params / original params."""
        return _ratio(self.compact_params, self.original_params)

    @property
    def flop_ratio(self) -> float | None:
        """compact FLOPs / original FLOPs."""
        return _ratio(self.compact_flops, self.original_flops)

    def changed_layers(self) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
        """``{layer: (shape before, shape after)}`` for layers whose weight shape changed."""
        names = list(self.widths_before) + [n for n in self.widths_after if n not in self.widths_before]
        return {
            n: (self.widths_before.get(n), self.widths_after.get(n))
            for n in names
            if self.widths_before.get(n) != self.widths_after.get(n)
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (shapes as lists), with the derived ratios included."""
        d = asdict(self)
        d["widths_before"] = {k: list(v) for k, v in self.widths_before.items()}
        d["widths_after"] = {k: list(v) for k, v in self.widths_after.items()}
        d["param_ratio"] = self.param_ratio
        d["flop_ratio"] = self.flop_ratio
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self, max_layers: int = 20) -> str:
        def num(n: int) -> str:
            return f"{n:,}"

        def rat(r: float | None, suffix: str = "x") -> str:
            return "n/a" if r is None else f"{r:.2f}{suffix}"

        o, c = self.original_latency, self.compact_latency
        rows = [
            ("", "original", "compact", "compact/original"),
            ("params", num(self.original_params), num(self.compact_params), rat(self.param_ratio)),
            ("FLOPs", num(self.original_flops), num(self.compact_flops), rat(self.flop_ratio)),
            ("latency median (ms)", f"{o.median_ms:.3f}", f"{c.median_ms:.3f}", rat(1 / self.speedup)),
            ("latency p10-p90 (ms)", f"{o.p10_ms:.3f}-{o.p90_ms:.3f}", f"{c.p10_ms:.3f}-{c.p90_ms:.3f}", ""),
            ("latency min (ms)", f"{o.min_ms:.3f}", f"{c.min_ms:.3f}", rat(_ratio(c.min_ms, o.min_ms))),
            ("ONNX exporter", self.original_exporter, self.compact_exporter, ""),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(
                cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)
            ).rstrip()
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("")
        lines.append(
            f"speed-up {rat(self.speedup)} (ideal from FLOPs {rat(self.ideal_speedup)}, "
            f"achieved {'n/a' if self.efficiency is None else f'{self.efficiency:.0%}'} of ideal); "
            f"onnxruntime CPU, {o.threads} threads, {o.runs} interleaved runs each"
        )
        changed = self.changed_layers()
        if changed:
            lines.append("")
            lines.append(f"layer widths changed: {len(changed)} of {len(self.widths_before)} layers")
            name_w = min(60, max(len(n) for n in changed))
            for k, (name, (before, after)) in enumerate(changed.items()):
                if k == max_layers:
                    lines.append(f"  ... and {len(changed) - max_layers} more")
                    break
                b = "x".join(map(str, before)) if before else "-"
                a = "x".join(map(str, after)) if after else "-"
                lines.append(f"  {name.ljust(name_w)}  {b} -> {a}")
        return "\n".join(lines)


def benchmark(
    original: nn.Module,
    compact: nn.Module,
    example_input: Any,
    *,
    warmup: int = 10,
    runs: int = 50,
    workdir: str | os.PathLike | None = None,
    threads: int | None = None,
    check: bool = True,
) -> BenchmarkReport:
    """Compare ``original`` and ``compact`` on ``example_input``: params, FLOPs, onnxruntime latency.

    Both models are exported to ONNX (into ``workdir`` if given, kept there as ``original.onnx`` and
    ``compact.onnx``; else a temporary directory), each export checked against torch unless
    ``check=False``, then timed in turns in the same process with the same thread count.
    Neither model is modified.
    """
    _check_counts(warmup, runs)
    threads = threads or default_threads()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphprune-bench-")))
        else:
            out = Path(workdir)
            out.mkdir(parents=True, exist_ok=True)
        exports: list[ExportResult] = [
            export_onnx(m, example_input, out / f"{tag}.onnx", check=check)
            for tag, m in (("original", original), ("compact", compact))
        ]
        lat_o, lat_c = interleaved_latency(
            [e.path for e in exports], example_input, warmup=warmup, runs=runs, threads=threads
        )
    flops_o, flops_c = count_flops(original, example_input), count_flops(compact, example_input)
    speedup = lat_o.median_ms / lat_c.median_ms if lat_c.median_ms > 0 else float("inf")
    ideal = _ratio(flops_o, flops_c)
    return BenchmarkReport(
        original_params=count_params(original),
        compact_params=count_params(compact),
        original_flops=flops_o,
        compact_flops=flops_c,
        original_latency=lat_o,
        compact_latency=lat_c,
        speedup=speedup,
        ideal_speedup=ideal,
        efficiency=None if ideal is None else speedup / ideal,
        original_exporter=exports[0].exporter,
        compact_exporter=exports[1].exporter,
        widths_before=layer_widths(original),
        widths_after=layer_widths(compact),
        original_onnx=None if workdir is None else str(exports[0].path),
        compact_onnx=None if workdir is None else str(exports[1].path),
    )
