"""Cold and warm time of one ``compact`` call, graphprune vs Torch-Pruning, side by side.

A user's first ``graphprune.compact(model, x, ratio=0.3)`` in a fresh process pays one-time costs
(imports made inside the call, torch.export's first use, kernel warm-up); that is the time a
user sees. So every (model, tool) pair runs in its own subprocess: the model is built (not
timed), then ``compact`` (default options, ``verify=True``) is timed twice on the same model:

* cold: the first call, including importing the tool itself (``import graphprune`` /
  ``import torch_pruning``) and everything it imports lazily;
* warm: a second call in the same process.

Torch-Pruning runs its documented recipe (tools/tp_baseline.py) on a deep copy, like
tools/compare.py. The report prints per-model times, the gp/TP ratios and their medians.

    python tools/cold_time.py                               # the default set (timm + torchvision)
    python tools/cold_time.py --models timm:tinynet_e,tv:resnet50 --side 224
    python tools/cold_time.py --models timm:tinynet_e --profile   # graphprune's stages (cProfile)
    python tools/cold_time.py --tools gp,gp-makefx,gp-export,tp   # also graphprune's other tracers

``gp-export`` is graphprune with ``GRAPHPRUNE_TRACE=export`` (no fast trace, docs/trace.md) and
``gp-makefx`` with ``GRAPHPRUNE_TRACE=make_fx`` (the fast trace without its eager recorder): the
"before"s, measured in the same run, model by model, next to the "after".

Models: ``timm:NAME`` (timm.create_model, random weights), ``tv:NAME`` (torchvision.models),
``tvseg:NAME`` (torchvision.models.segmentation). timm/torchvision must be importable
(``PYTHONPATH`` with them); torchvision's compiled extension is not needed (compare.py's
``import_torchvision``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = (
    "timm:tinynet_e", "timm:fbnetv3_b", "timm:repvit_m1", "timm:efficientnet_b0",
    "timm:vit_tiny_patch16_224", "tv:mobilenet_v3_large", "tv:resnet50",
    "tvseg:deeplabv3_mobilenet_v3_large",
)
# graphprune's stages as cProfile sees them: (label, file suffix, function name)
STAGES = (
    ("trace (torch.export)", "graph/trace.py", "trace"),
    ("analysis (all)", "graph/analysis.py", "analyze"),
    ("plan", "planning/plan.py", "build_plan"),
    ("surgery (slice + run)", "graphprune/engine.py", "_surgery"),
    ("  run at new sizes", "surgery/attributes.py", "choose_attr_updates"),
    ("fallback rounds", "graphprune/engine.py", "_freeze"),
    ("verify (all)", "graphprune/verify.py", "verify_compact"),
    ("  masked reference", "reference/run.py", "run_reference"),
    ("  float64 tolerance", "reference/tolerance.py", "rounding_amplification"),
    ("  compact model run", "reference/run.py", "small_outputs"),
    ("  compact model run, block by block", "reference/blockwise.py", "run_blockwise"),
)


def build(spec: str, side: int) -> tuple[Any, Any]:
    """(model in eval mode, example input) for ``timm:NAME`` / ``tv:NAME`` / ``tvseg:NAME``."""
    import torch

    sys.path.insert(0, str(HERE))
    from compare import import_torchvision

    kind, _, name = spec.partition(":")
    torch.manual_seed(0)
    tv = import_torchvision()
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    elif kind == "tv":
        model = getattr(tv.models, name)(weights=None)
    elif kind == "tvseg":
        model = getattr(tv.models.segmentation, name)(weights=None, weights_backbone=None)
    else:
        raise SystemExit(f"unknown model kind {kind!r} in {spec!r}: use timm:, tv: or tvseg:")
    return model.eval(), torch.randn(1, 3, side, side)


def child(spec: str, tool: str, side: int, ratio: float, profile: bool) -> dict[str, Any]:
    """Build the model, then time the first and the second compact call (this process only)."""
    warnings.simplefilter("ignore")
    model, x = build(spec, side)
    times: list[float] = []
    stages: dict[str, float] = {}
    for attempt in range(2):
        prof = cProfile.Profile() if profile and attempt == 0 else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        if tool == "gp":
            sys.path.insert(0, str(HERE.parent))
            import graphprune

            graphprune.compact(model, x, ratio=ratio)
        else:
            from tp_baseline import prune_with_tp

            prune_with_tp(copy.deepcopy(model), x, ratio)
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t0)
        if prof:
            stages = stage_times(prof)
    return {"model": spec, "tool": tool, "cold_s": times[0], "warm_s": times[1], "stages": stages}


def stage_times(prof: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds per stage (cProfile inflates Python-heavy parts; compare shares)."""
    stats = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, suffix, func in STAGES:
        total = sum(v[3] for (file, _, fn), v in stats.items() if fn == func and file.endswith(suffix))
        out[label] = total
    return out


# graphprune with another tracer: GRAPHPRUNE_TRACE (docs/trace.md)
VARIANTS = {"gp-export": "export", "gp-makefx": "make_fx"}


def run_child(spec: str, tool: str, args: argparse.Namespace) -> dict[str, Any]:
    child_tool = "gp" if tool in VARIANTS else tool
    cmd = [sys.executable, __file__, "--child", spec, child_tool, "--side", str(args.side),
           "--ratio", str(args.ratio)]
    if args.profile and child_tool == "gp":
        cmd.append("--profile")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    if tool in VARIANTS:
        env["GRAPHPRUNE_TRACE"] = VARIANTS[tool]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": spec, "tool": tool, "error": f"timeout after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "tool": tool}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": spec, "tool": tool, "error": tail[:200]}


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:8.2f}" if key in row else f"{'-':>8s}"


def _ratio(gp: dict[str, Any], tp: dict[str, Any], key: str) -> str:
    return f"{gp[key] / tp[key]:6.2f}" if key in gp and key in tp else f"{'-':>6s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--side", type=int, default=224, help="input image side")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--tools", default="gp,tp")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (0: "
                        "torch's default). 1 by default: on a shared, loaded machine torch's thread "
                        "pool waits on busy cores and a forward pass takes 20x longer")
    parser.add_argument("--profile", action="store_true", help="graphprune's cold stages (cProfile)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--no-precompile", action="store_true", help="do not write graphprune's bytecode "
                        "first (tools/precompile.py): with PYTHONDONTWRITEBYTECODE set, every fresh process "
                        "then compiles its modules from source")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.side, args.ratio, args.profile)), flush=True)
        return
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from precompile import compile_packages

    if not args.no_precompile:
        compile_packages("graphprune", "torch_pruning")  # both start from what an install holds
    rows = []
    tools = args.tools.split(",")
    gps = [t for t in tools if t == "gp" or t in VARIANTS]
    print(f"{'model':40s}" + "".join(f" {t + ' cold':>14s} {'ratio':>6s} {t + ' warm':>14s} {'ratio':>6s}"
                                     for t in gps) + f" {'tp cold':>8s} {'tp warm':>8s}")
    for spec in args.models.split(","):
        got = {tool: run_child(spec, tool, args) for tool in tools}
        rows.extend(got.values())
        tp = got.get("tp", {})
        print(f"{spec:40s}" + "".join(
            f" {_cell(got[t], 'cold_s'):>14s} {_ratio(got[t], tp, 'cold_s')} "
            f"{_cell(got[t], 'warm_s'):>14s} {_ratio(got[t], tp, 'warm_s')}" for t in gps)
            + f" {_cell(tp, 'cold_s')} {_cell(tp, 'warm_s')}", flush=True)
        for r in got.values():
            if "error" in r:
                print(f"    {r['tool']}: {r['error']}", flush=True)
        stages = got.get("gp", {}).get("stages")
        if stages:
            for label, secs in stages.items():
                print(f"    {label:28s} {secs:6.2f} s (cProfile)", flush=True)
    for name in gps:
        for key in ("cold_s", "warm_s"):
            ok = [(g, t) for g in rows if g["tool"] == name and key in g
                  for t in rows if t["tool"] == "tp" and t["model"] == g["model"] and key in t]
            if ok:
                med_gp = statistics.median(g[key] for g, _ in ok)
                med_tp = statistics.median(t[key] for _, t in ok)
                med_ratio = statistics.median(g[key] / t[key] for g, t in ok)
                tracer = f" (GRAPHPRUNE_TRACE={VARIANTS[name]})" if name in VARIANTS else ""
                print(f"median {key[:-2]}: graphprune{tracer} {med_gp:.2f} s, Torch-Pruning "
                      f"{med_tp:.2f} s, median ratio {med_ratio:.2f} ({len(ok)} models)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
