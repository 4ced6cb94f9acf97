"""Does measured latency follow FLOPs? Ratio sweeps of several models, with and without round_to.

For every model: compact at each ratio (one analysis per model and round_to), export each
compact model to ONNX, time it in onnxruntime interleaved with the original, and report the
measured speed-up next to the ideal one (original FLOPs / compact FLOPs). ``efficiency`` =
measured / ideal. Writes per-model JSON and PNG plus a markdown summary.

    python tools/sweep.py                                   # zoo CNNs + ViT-Ti, bench size
    python tools/sweep.py --models resnet50 --round-to 1,8,16 --ratios 0.3,0.5
    python tools/sweep.py --out /tmp/sweeps --runs 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = "resnet50,mobilenetv2,vgg,vit_tiny"


def summary(model: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["ratio"] == 0:
            continue
        cells = [
            model, str(r["round_to"]), f"{r['ratio']:.2f}",
            f"{r['params_frac']:.1%}", f"{r['flops_frac']:.1%}",
            f"{r['baseline_ms']:.2f}", f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x",
            f"{r['ideal_speedup']:.2f}x", f"{r['efficiency']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="zoo model names, comma-separated")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--ratios", default="0,0.2,0.4,0.6")
    p.add_argument("--round-to", default="1,8", help="round_to values, comma-separated")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="sweep_out", help="output directory")
    args = p.parse_args(argv)

    from graphprune import zoo
    from graphprune.export.report import plot_sweep
    from graphprune.search.targets import sweep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    rounds = [int(r) for r in args.round_to.split(",")]
    table = [
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| model | round_to | ratio | params | FLOPs | original ms | compact ms | speed-up | ideal "
        "| efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models.split(","):
        model, x = zoo.build(name, args.size)
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for n in rounds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows += sweep(model, x, ratios, round_to=n, runs=args.runs, warmup=args.warmup, progress=True)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        title = f"{name} ({args.size}): onnxruntime CPU, {args.runs} runs"
        plot_sweep(rows, out / f"{name}.png", title=title)
        table += summary(name, rows)
        print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text = "\n".join(table)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
