"""The seeds' recipe measured: torch.nn.utils.prune.ln_structured on every conv, then compact.

    python tools/prune_masks.py [--out docs/methods/prune-masks-measured.md] [--runs 30]
                                [--models digits,vgg,resnet18] [--amount 0.3]

``prune.ln_structured(conv, "weight", amount, n=2, dim=0)`` on every Conv2d zeroes whole output
channels but keeps every tensor (and adds a mask of the same size), so the masked model is as
large and as slow as the original. ``graphprune.compact(masked, x, importance="mask")`` removes
the emptied channels. For each model this prints, in one run: params, the state_dict size
(the masked model's holds ``weight_orig`` *and* ``weight_mask``), FLOPs, the ONNX file and the
onnxruntime latency of the original, the masked model (exported as the dense model it computes),
the compact model, and - side by side, same model, same per-layer amount - Torch-Pruning's
MetaPruner (L2, its README recipe; it does not read masks, so it chooses its own channels).
Latencies: all variants of one model interleaved in one process, three rounds, best median.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from methods_size import bench_model, onnx_latencies  # noqa: E402

import graphprune  # noqa: E402
from graphprune.methods.prune_masks import fold_masks  # noqa: E402


def state_kib(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue()) / 1024


def seeds_recipe(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """ln_structured (L2, output rows) on every Conv2d of a copy; on every hidden Linear of a model
    without convolutions (an MLP), whose last Linear is left alone: its rows are the outputs."""
    masked = copy.deepcopy(model)
    convs = [m for m in masked.modules() if isinstance(m, torch.nn.Conv2d)]
    targets = convs or [m for m in masked.modules() if isinstance(m, torch.nn.Linear)][:-1]
    for mod in targets:
        prune.ln_structured(mod, "weight", amount=amount, n=2, dim=0)
    return masked


def variants(model: torch.nn.Module, x: torch.Tensor, amount: float) -> dict[str, tuple]:
    """label -> (model to export and time, model whose state_dict is what the user stores)."""
    masked = seeds_recipe(model, amount)
    where = "conv" if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) else "hidden linear"
    small = graphprune.compact(masked, x, importance="mask")
    out = {
        "original": (model, model),
        f"ln_structured {amount:g} on every {where} (masked)": (fold_masks(masked)[0], masked),
        "  + graphprune.compact(importance='mask')": (small, small),
    }
    try:
        from tp_baseline import prune_with_tp

        tp_model = prune_with_tp(copy.deepcopy(model), x, amount)
        out[f"Torch-Pruning MetaPruner L2, ratio {amount:g} (ignores masks)"] = (tp_model, tp_model)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
        print(f"Torch-Pruning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, runs: int, amount: float) -> list[str]:
    model.eval()
    vs = variants(model, x, amount)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths, lat = onnx_latencies([m for m, _ in vs.values()], x, runs, Path(d))
        for (label, (m, stored)), p, ms in zip(vs.items(), paths, lat):
            rows.append(
                f"| {label} | {graphprune.count_params(m):,} | {state_kib(stored):.0f} | "
                f"{graphprune.count_flops(m, x) / 1e6:.1f} | {p.stat().st_size / 1024:.0f} | {ms:.2f} | "
                f"{lat[0] / ms:.2f}x |"
            )
    return [
        f"### {name}",
        "",
        "| variant | params | state_dict KiB | MFLOPs | ONNX KiB | onnxruntime ms (best of 3 medians) "
        "| speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--models", default="digits,vgg,resnet18")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [
        f"`python tools/prune_masks.py --amount {args.amount:g}` (torch {torch.__version__}, onnxruntime "
        "on CPU, 1 thread, random weights: sizes and speed do not depend on training).",
        "",
    ]
    for key in args.models.split(","):
        model, x, name = bench_model(key)
        lines += measure(name, model, x, args.runs, args.amount)
    lines.append(f"Run time {time.perf_counter() - t0:.0f}s.")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
