"""Size and latency of the classic (mask-based) methods next to ``graphprune.compact``.

    python tools/methods_size.py [--out docs/methods/measurements.md] [--runs 30] [--models digits,resnet18]

The classic methods zero weights but keep every tensor's shape, so the saved file, the ONNX file
and the onnxruntime latency stay those of the original model; only a compressor (gzip) notices
the zeros. ``compact`` removes whole channels. Each model variant is exported to ONNX and timed
with onnxruntime, all variants of one model interleaved in the same process (so machine load
drifts hit all alike), three rounds; the best of the three medians is reported.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphprune  # noqa: E402
from graphprune import unstructured as U  # noqa: E402
from graphprune import zoo  # noqa: E402
from graphprune.cli.demo import DigitsCNN  # noqa: E402
from graphprune.export.bench import count_flops, interleaved_latency  # noqa: E402


def state_bytes(model: torch.nn.Module) -> tuple[int, int]:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=6))


def nonzero_params(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    small = graphprune.compact(model, x, 0.5)
    share = 1 - graphprune.count_params(small) / graphprune.count_params(model)
    out: dict[str, torch.nn.Module] = {"original": model}
    out["compact(ratio=0.5)"] = small
    m = U.magnitude_prune(copy.deepcopy(model), 0.5)
    out["magnitude 50% (local)"] = U.make_permanent(m)
    m = U.magnitude_prune(copy.deepcopy(model), round(share, 3), scope="global")
    out[f"magnitude {share:.0%} global (= compact's params)"] = U.make_permanent(m)
    out["random 50%"] = U.make_permanent(U.random_prune(copy.deepcopy(model), 0.5))
    convs = [
        n
        for n, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.weight.shape[1] % 4 == 0
    ]
    out["2:4 (N:M)"] = U.make_permanent(U.nm_prune(copy.deepcopy(model), 2, 4, params=convs))
    out["kernels 50%"] = U.make_permanent(U.kernel_prune(copy.deepcopy(model), 0.5))
    out["4x4 blocks 50%"] = U.make_permanent(U.block_prune(copy.deepcopy(model), 0.5, 4))
    logits = model(x)
    data = [(x, logits.argmax(1))]
    out["SNIP 50%"] = U.make_permanent(U.snip(copy.deepcopy(model), data, 0.5, loss_fn=F.cross_entropy))
    return out


def onnx_latencies(models: list[torch.nn.Module], x: torch.Tensor, runs: int,
                   folder: Path) -> tuple[list[Path], list[float]]:
    """Export each model to ``folder`` and time them with onnxruntime: (paths, ms per model).

    Three interleaved rounds, best median per model: a burst of load from other processes on a
    shared machine can hit one model's samples in one round (seen: 6x outliers).
    """
    paths = []
    for i, m in enumerate(models):
        p = folder / f"m{i}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphprune.export_onnx(m.eval(), x, p)
        paths.append(p)
    rounds = [interleaved_latency(paths, x, warmup=5, runs=runs, threads=1) for _ in range(3)]
    return paths, [min(r[i].median_ms for r in rounds) for i in range(len(paths))]


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, runs: int) -> list[str]:
    model.eval()
    vs = variants(model, x)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths, lat = onnx_latencies(list(vs.values()), x, runs, Path(d))
        base = lat[0]
        for (label, m), p, ms in zip(vs.items(), paths, lat):
            raw, gz = state_bytes(m)
            rows.append(
                f"| {label} | {graphprune.count_params(m):,} | {nonzero_params(m):,} | "
                f"{count_flops(m, x) / 1e6:.1f} | {raw / 1024:.0f} | {gz / 1024:.0f} | "
                f"{p.stat().st_size / 1024:.0f} | {ms:.2f} | {base / ms:.2f}x |"
            )
    head = [
        f"### {name}",
        "",
        "| variant | params | non-zero | MFLOPs (dense) | state_dict KiB | gzip KiB | ONNX KiB "
        "| onnxruntime ms (best of 3 medians) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return head + rows + [""]


def bench_model(key: str) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """``--models`` entry -> (model, input, row title): "digits" (the demo CNN) or a zoo name."""
    if key == "digits":
        return DigitsCNN().eval(), torch.randn(64, 1, 8, 8), "DigitsCNN (graphprune demo), batch 64 of 1x8x8"
    model, x = zoo.build(key, "bench")
    return model, x, f"zoo {key} (bench size), input {tuple(x.shape)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "methods" / "measurements.md"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--models", default="digits,resnet18")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lines = [
        "## Measured: mask-based methods vs compact",
        "",
        f"`python tools/methods_size.py` (torch {torch.__version__}, onnxruntime on CPU, 1 thread, "
        "weights random: size and speed do not depend on training).",
        "",
    ]
    for key in args.models.split(","):
        model, x, name = bench_model(key)
        lines += measure(name, model, x, args.runs)
    lines.append(f"Run time {time.perf_counter() - t0:.0f}s.")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
