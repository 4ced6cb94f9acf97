"""Which channel widths onnxruntime's CPU kernels run well, measured per op type.

    python tools/width_speed.py [--rounds 25] [--ops depthwise,dense,pointwise,grouped,linear,linear_small]
                                [--json out.json]

Why: a pruned layer's width decides which kernel onnxruntime picks. On x86 the NCHWc layout
(MLAS) only takes convolutions whose channel counts are multiples of its block size (16 with
AVX-512, 8 with AVX2); other convolutions run in plain NCHW, where a depthwise convolution whose
width is not a multiple of 4 turned out much slower per FLOP. GEMMs (Linear/MatMul) pack columns
in panels and have ragged tails. This script measures it instead of assuming it: for each op
type it builds a small block (the layer at width ``w`` between fixed-width neighbours, as in a
real network), exports it to ONNX and times every width in one process.

Timing: one onnxruntime intra-op thread, all graph optimisations on (as deployed); every round
runs every width once in a freshly shuffled order, several inferences per sample, and the lower
quartile over rounds is reported, so that the load of a shared machine drifting during the run hits every
width alike. Numbers taken on a loaded machine are noisy; compare classes, not single widths.

The report gives, per op and per width, the latency and the *efficiency* = (FLOPs(w) / FLOPs(base))
/ (time(w) / time(base)), base = the widest (aligned) width: 1.0 means latency fell in proportion
to FLOPs. The summary is the median efficiency of the widths in each alignment class (multiple of
16, of 8 but not 16, of 4 but not 8, other).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class OpCase:
    """One op type: a block builder ``width -> (module, input)``, the widths to try, and the base."""

    name: str
    build: Callable[[int], tuple[nn.Module, torch.Tensor]]
    widths: list[int]
    base: int
    what: str


def _depthwise(w: int) -> tuple[nn.Module, torch.Tensor]:
    """MobileNetV2's inverted residual: expand 1x1 to ``w``, depthwise 3x3 on ``w``, project 1x1."""
    m = nn.Sequential(
        nn.Conv2d(32, w, 1), nn.ReLU6(),
        nn.Conv2d(w, w, 3, padding=1, groups=w), nn.ReLU6(),
        nn.Conv2d(w, 32, 1),
    )
    return m, torch.randn(1, 32, 56, 56)


def _dense(w: int) -> tuple[nn.Module, torch.Tensor]:
    """Two 3x3 convolutions with ``w`` channels between them (VGG/ResNet basic block)."""
    m = nn.Sequential(nn.Conv2d(64, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 64, 3, padding=1))
    return m, torch.randn(1, 64, 28, 28)


def _pointwise(w: int) -> tuple[nn.Module, torch.Tensor]:
    """Two 1x1 convolutions with ``w`` channels between them (MobileNet's expand/project)."""
    m = nn.Sequential(nn.Conv2d(64, w, 1), nn.ReLU(), nn.Conv2d(w, 64, 1))
    return m, torch.randn(1, 64, 56, 56)


def _grouped(w: int) -> tuple[nn.Module, torch.Tensor]:
    """ResNeXt's bottleneck: 1x1 to ``w``, 3x3 in 4 groups, 1x1 back (``w`` a multiple of 4)."""
    m = nn.Sequential(
        nn.Conv2d(64, w, 1), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(w, 64, 1),
    )
    return m, torch.randn(1, 64, 28, 28)


def _linear(w: int) -> tuple[nn.Module, torch.Tensor]:
    """A transformer MLP: Linear 256 -> ``w``, GELU, Linear ``w`` -> 256 on 128 tokens (MatMul)."""
    m = nn.Sequential(nn.Linear(256, w), nn.GELU(), nn.Linear(w, 256))
    return m, torch.randn(1, 128, 256)


def _linear_small(w: int) -> tuple[nn.Module, torch.Tensor]:
    """A narrow MLP (Linear 64 -> ``w`` -> 64) on 128 tokens: GEMM tails weigh more when narrow."""
    m = nn.Sequential(nn.Linear(64, w), nn.GELU(), nn.Linear(w, 64))
    return m, torch.randn(1, 128, 64)


CASES = {
    "depthwise": OpCase("depthwise", _depthwise, list(range(80, 97)), 96,
                        "1x1 32->w, depthwise 3x3 on w, 1x1 w->32, 56x56"),
    "dense": OpCase("dense", _dense, list(range(48, 65)), 64, "3x3 64->w, 3x3 w->64, 28x28"),
    "pointwise": OpCase("pointwise", _pointwise, list(range(48, 65)), 64,
                        "1x1 64->w, 1x1 w->64, 56x56"),
    "grouped": OpCase("grouped", _grouped, list(range(32, 65, 4)), 64,
                      "1x1 64->w, 3x3 w->w in 4 groups, 1x1 w->64, 28x28"),
    "linear": OpCase("linear", _linear, list(range(240, 257)), 256,
                     "Linear 256->w, GELU, Linear w->256, 128 tokens"),
    "linear_small": OpCase("linear_small", _linear_small, list(range(48, 65)), 64,
                           "Linear 64->w, GELU, Linear w->64, 128 tokens"),
}


def alignment_class(w: int) -> str:
    for a in (16, 8, 4):
        if w % a == 0:
            return f"x{a}"
    return "other"


def flops(case: OpCase, w: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model, x = case.build(w)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def export(model: nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=False, opset_version=17)


def session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


# The lower quartile of the per-round samples, not the median: on a shared machine a sample is
# either clean or hit by another process, and the hits only ever add time.
QUANTILE = 25


def time_interleaved(runners: dict[str, Callable[[], object]], rounds: int, inner: int,
                     seed: int = 0) -> dict[str, float]:
    """Lower-quartile ms per inference: each round runs every runner ``inner`` times, shuffled order."""
    rng = random.Random(seed)
    keys = list(runners)
    for k in keys:  # warm-up
        for _ in range(3):
            runners[k]()
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            t0 = time.perf_counter()
            for _ in range(inner):
                runners[k]()
            samples[k].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: float(np.percentile(v, QUANTILE)) for k, v in samples.items()}


def measure(case: OpCase, rounds: int, inner: int, workdir: str) -> list[dict[str, object]]:
    torch.manual_seed(0)
    runners: dict[str, Callable[[], object]] = {}
    for w in case.widths:
        model, x = case.build(w)
        path = os.path.join(workdir, f"{case.name}_{w}.onnx")
        export(model, x, path)
        sess = session(path)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        runners[str(w)] = lambda s=sess, f=feed: s.run(None, f)
    ms = time_interleaved(runners, rounds, inner)
    base_ms, base_flops = ms[str(case.base)], flops(case, case.base)
    rows = []
    for w in case.widths:
        f = flops(case, w)
        eff = (f / base_flops) / (ms[str(w)] / base_ms)
        rows.append({"op": case.name, "width": w, "class": alignment_class(w), "ms": ms[str(w)],
                     "flops_frac": f / base_flops, "efficiency": eff})
    return rows


def summarise(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        by: dict[str, list[float]] = {}
        for r in rows:
            if r["op"] == op and r["width"] != CASES[op].base:
                by.setdefault(str(r["class"]), []).append(float(r["efficiency"]))
        out[str(op)] = {c: statistics.median(v) for c, v in sorted(by.items())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(CASES), help="subset of: " + ",".join(CASES))
    p.add_argument("--rounds", type=int, default=25, help="interleaved rounds (lower quartile over them)")
    p.add_argument("--inner", type=int, default=2, help="inferences per sample")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {list(CASES)}")
    torch.set_num_threads(1)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, 1 thread, {args.rounds} interleaved rounds x "
          f"{args.inner} inferences, lower quartile; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="width_speed_") as workdir:
        for op in ops:
            case = CASES[op]
            print(f"\n== {op}: {case.what} ==", flush=True)
            got = measure(case, args.rounds, args.inner, workdir)
            rows += got
            for r in got:
                print(f"  w={r['width']:>4} {r['class']:>5}  {r['ms']:8.3f} ms  FLOPs {r['flops_frac']:.2f}"
                      f"  efficiency {r['efficiency']:.2f}", flush=True)
    print("\nmedian efficiency by alignment class (1.0 = latency follows FLOPs):")
    summary = summarise(rows)
    classes = ["x16", "x8", "x4", "other"]
    print(f"  {'op':<10}" + "".join(f"{c:>8}" for c in classes))
    for op, by in summary.items():
        print(f"  {op:<10}" + "".join(f"{by[c]:8.2f}" if c in by else f"{'-':>8}" for c in classes))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary, "threads": 1, "rounds": args.rounds}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
