"""What the rewrite fallback (docs/rewrite.md) buys on timm models, next to Torch-Pruning.

For each model (random weights, eval, ratio 0.3, batch 1 example), in one process:

* graphprune with ``fallback="whole"`` (modules that cannot run smaller kept whole: the old default)
* graphprune by default (those modules rewritten as graphs where that verifies exact)
* Torch-Pruning's documented recipe (tools/tp_baseline.py)

and prints params kept, the rewritten classes, compaction time and latency at ``--batch``
(median of ``--reps`` runs, interleaved, torch CPU). Needs timm (``PYTHONPATH=/work/wt/speed-extra``)::

    python tools/rewrite_bench.py cs3darknet_focus_s vit_tiny_patch16_dinov3_qkvb --batch 8

``--micro`` (no timm) instead times a rewritten attention against the same attention written to
run smaller (``reshape(B, N, -1)``), both compacted by graphprune at the same sizes: the rewrite
must be as fast as the user's own code, and give the same outputs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune  # noqa: E402


def _latency(models: dict[str, torch.nn.Module], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms per model; NaN for a model that does not run at this batch (reported, not hidden)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for k, m in list(models.items()):
            try:
                m(x)
            except Exception:  # noqa: BLE001
                times[k] = [float("nan")]
                models = {n: v for n, v in models.items() if n != k}
        for _ in range(reps):  # interleaved: the machine's load hits every model alike
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def micro(batch: int, reps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from rewrite_models import InputWidthAttention
    from torch import nn

    class RunsSmaller(InputWidthAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, N, _ = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(B, N, -1))

    torch.manual_seed(0)
    a = nn.Sequential(*[InputWidthAttention(384, 6) for _ in range(4)]).eval()
    b = nn.Sequential(*[RunsSmaller(384, 6) for _ in range(4)]).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 64, 384)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small_a, small_b = graphprune.compact(a, x, 0.5), graphprune.compact(b, x, 0.5)
    xb = torch.randn(batch, 64, 384)
    with torch.no_grad():
        diff = (small_a(xb) - small_b(xb)).abs().max().item()
    lat = _latency({"rewritten": small_a, "user code": small_b}, xb, reps)
    na, nb = type(small_a[0]).__name__, type(small_b[0]).__name__
    pa, pb = graphprune.count_params(small_a), graphprune.count_params(small_b)
    print(f"4 attention blocks (dim 384, 6 heads, ratio 0.5), batch {batch}: "
          f"{na} {lat['rewritten']:.2f} ms vs {nb} {lat['user code']:.2f} ms; "
          f"params {pa} vs {pb}; max |diff| {diff:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--micro", action="store_true", help="rewritten vs hand-fixed attention, no timm")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    args = ap.parse_args()
    if args.micro:
        micro(args.batch, args.reps)
        return
    from compare import import_torchvision

    import_torchvision()
    import timm

    print("model | kept whole: params, s | rewrite: params, s, rewritten | TP: params, s | "
          f"latency ms at batch {args.batch}: original / whole / rewrite / TP")
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg["input_size"][1:]
        x1, xb = torch.randn(1, 3, *size), torch.randn(args.batch, 3, *size)
        n0 = graphprune.count_params(model)
        row, models = [name], {"original": model}
        for fb in ("whole", "freeze"):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, plan = graphprune.compact_with_plan(model, x1, args.ratio, fallback=fb)
            spent = time.perf_counter() - t
            models[fb] = small
            row.append(f"{graphprune.count_params(small) / n0:.3f}, {spent:.1f}")
            if fb == "freeze":
                classes = sorted({type(model.get_submodule(r["module"])).__name__ for r in plan.rewrites})
                row[-1] += f", {len(plan.rewrites)} {'/'.join(classes) or '-'}"
        if not args.no_tp:
            from tp_baseline import prune_with_tp

            t = time.perf_counter()
            try:
                tp_model = prune_with_tp(copy.deepcopy(model), x1, args.ratio)
                models["tp"] = tp_model
                row.append(f"{graphprune.count_params(tp_model) / n0:.3f}, {time.perf_counter() - t:.1f}")
            except Exception as exc:  # noqa: BLE001 - TP's failures are reported, not hidden
                row.append(f"failed ({type(exc).__name__})")
        lat = _latency(models, xb, args.reps)
        row.append(" / ".join(f"{lat[k]:.0f}" for k in models))
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
