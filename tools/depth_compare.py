"""Width-only vs depth-only vs both at equal FLOPs, with Torch-Pruning's width cut beside them.

For each model (graphprune.zoo's ResNet-50 at bench size, a LLaMA-style decoder built from a
config), in one process:

1. depth-only: ``compact(depth=D)`` removes a fraction ``D`` of the removable blocks; its FLOPs
   fraction ``F`` is the budget every other row must meet;
2. width-only: ``compact(target_flops=F)`` (graphprune's ratio search, within 2 %);
3. both: half the blocks (``depth=round(D * n / 2)`` blocks), then widths cut until the whole
   model is at ``F``;
4. Torch-Pruning 1.6 (its documented recipe, ``tools/tp_baseline.py``) at the width ratio that
   row 2 found; it has no depth pruning.

Latency: onnxruntime median of each model, timed against the same original in
``graphprune.benchmark`` (interleaved runs). Usage::

    python tools/depth_compare.py [--depth 0.25] [--runs 30] [--models resnet50,llama] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune  # noqa: E402
from graphprune import zoo  # noqa: E402


def _llama() -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 2000, (1, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def _resnet50() -> tuple[nn.Module, Any]:
    model, x = zoo.build("resnet50", "bench")[:2]
    return model, x


MODELS = {"resnet50": _resnet50, "llama": _llama}


def _row(name: str, variant: str, base: nn.Module, small: nn.Module | None, x: Any, runs: int,
         detail: str) -> dict[str, Any]:
    if small is None:
        return {"model": name, "variant": variant, "detail": detail}
    rep = graphprune.benchmark(base, small, x, runs=runs, warmup=5)
    return {
        "model": name, "variant": variant, "detail": detail,
        "params": rep.compact_params / rep.original_params,
        "flops": rep.compact_flops / rep.original_flops,
        "orig_ms": rep.original_latency.median_ms, "ms": rep.compact_latency.median_ms,
        "speedup": rep.speedup,
    }


def compare(name: str, depth: float, runs: int) -> list[dict[str, Any]]:
    model, x = MODELS[name]()
    flops = graphprune.count_flops(model, x)
    blocks = [b for b in graphprune.find_blocks(model, x) if b.removable]
    n = int(round(depth * len(blocks)))
    rows = []
    t = time.time()
    deep, plan = graphprune.compact_with_plan(model, x, depth=n)
    budget = graphprune.count_flops(deep, x) / flops
    rows.append(_row(name, "depth only", model, deep, x, runs,
                     f"{n}/{len(blocks)} blocks ({time.time() - t:.0f} s)"))
    t = time.time()
    wide, wplan = graphprune.compact_with_plan(model, x, target_flops=budget)
    rows.append(_row(name, "width only", model, wide, x, runs,
                     f"ratio {wplan.ratio:.3f} ({time.time() - t:.0f} s)"))
    half = n // 2
    t = time.time()
    both, bplan = graphprune.compact_with_plan(model, x, depth=half, target_flops=budget)  # whole model
    rows.append(_row(name, "both", model, both, x, runs,
                     f"{half} blocks + ratio {bplan.ratio:.3f} ({time.time() - t:.0f} s)"))
    try:
        from tp_baseline import prune_with_tp

        t = time.time()
        tp_small = prune_with_tp(copy.deepcopy(model), x, wplan.ratio)
        rows.append(_row(name, "Torch-Pruning width", model, tp_small, x, runs,
                         f"ratio {wplan.ratio:.3f} ({time.time() - t:.0f} s)"))
    except Exception as exc:  # noqa: BLE001 - TP's failure is a result, reported as such
        rows.append(_row(name, "Torch-Pruning width", model, None, x, runs,
                         f"failed: {type(exc).__name__}: {str(exc)[:60]}"))
    del plan
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| model | variant | what was cut | params | FLOPs | orig ms | ms | speed-up |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            out.append(f"| {r['model']} | {r['variant']} | {r['detail']} |  |  |  |  |  |")
            continue
        out.append(f"| {r['model']} | {r['variant']} | {r['detail']} | {r['params']:.2f} | "
                   f"{r['flops']:.2f} | {r['orig_ms']:.2f} | {r['ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--models", default="resnet50,llama")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        rows.extend(compare(name, args.depth, args.runs))
        print(markdown(rows) if args.markdown else rows[-4:], flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
