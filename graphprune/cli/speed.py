"""``graphprune sweep`` and ``graphprune target``: the speed commands of the command line.

Kept apart from ``cli/commands.py`` (which registers them with one call) so the measured-speed
features live next to each other: ``sweep`` draws latency vs ratio, ``target`` searches the ratio
that meets a FLOPs / params / speed-up / latency target. Both show progress bars (the library
calls they wrap are quiet by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import graphprune
from graphprune.cli.common import (
    MODEL_HELP,
    add_importance_arg,
    add_structure_args,
    load_model,
    parse_round_to,
    shape_arg,
)
from graphprune.errors import InputError


def _ratios(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        msg = f"--ratios must be numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1), got {text!r}")
    return values


def _round_to(text: str) -> int | str:
    return parse_round_to(text, extra=("measured",))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--input-shape", type=shape_arg, metavar="SHAPE",
                   help="shape of a random float32 example input, e.g. 1,3,224,224")
    p.add_argument("--size", default=None, help="size of a zoo: model: 'tiny' (default) or 'bench'")
    add_importance_arg(p)
    add_structure_args(p)
    p.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per model (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per model (default 5)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all usable cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    return load_model(args.model, args.input_shape, args.size)


def _rows_table(rows: list[dict[str, Any]]) -> str:
    from graphprune.search.results import Candidate, candidates_table

    fields = Candidate.__dataclass_fields__
    return candidates_table([Candidate(**{k: v for k, v in r.items() if k in fields}) for r in rows])


def cmd_sweep(args: argparse.Namespace) -> int:
    from graphprune.search.targets import sweep

    model, example = _load(args)
    t0 = time.perf_counter()
    rows = sweep(model, example, args.ratios, importance=args.importance or "l2",
                 ignored_layers=tuple(args.ignore),
                 prune_hidden=args.prune_hidden, attention=args.attention, round_to=args.round_to,
                 latency=not args.no_latency, runs=args.runs, warmup=args.warmup,
                 threads=args.threads, progress=not args.quiet)
    print(_rows_table(rows))
    print(f"swept {len(rows)} ratios in {time.perf_counter() - t0:.1f}s "
          + ("(speed-up: original / compact median, timed interleaved)" if not args.no_latency else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from graphprune.export.report import plot_sweep

        print(f"wrote {plot_sweep(rows, args.plot, title=f'{args.model}: ratio sweep')}")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    from graphprune.search.targets import compact_to_target

    targets = {
        "target_flops": args.flops,
        "target_params": args.params,
        "target_speedup": args.speedup,
        "target_latency_ms": args.latency_ms,
    }
    if sum(v is not None for v in targets.values()) != 1:
        raise InputError("give exactly one of --flops, --params, --speedup, --latency-ms")
    model, example = _load(args)
    t0 = time.perf_counter()
    if args.with_depth:
        from graphprune.search.mix import search_mix

        mix = search_mix(model, example, targets, importance=args.importance or "l2",
                         ignored_layers=tuple(args.ignore), prune_hidden=args.prune_hidden,
                         attention=args.attention, runs=args.runs or 20)
        print(mix)
        print(f"searched in {time.perf_counter() - t0:.1f}s")
        if args.plan:
            Path(args.plan).write_text(mix.plan.to_json())
            print(f"wrote plan to {args.plan}")
        return 0
    result = compact_to_target(model, example, **targets, importance=args.importance or "l2",
                               ignored_layers=tuple(args.ignore), prune_hidden=args.prune_hidden,
                               attention=args.attention, round_to=args.round_to,
                               tolerance=args.tolerance, runs=args.runs, warmup=args.warmup,
                               threads=args.threads, max_candidates=args.max_candidates,
                               progress=not args.quiet)
    print(result)
    print(f"searched in {time.perf_counter() - t0:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plan:
        Path(args.plan).write_text(result.plan.to_json())
        print(f"wrote plan to {args.plan}")
    if args.output:
        torch.save(result.model, args.output)
        print(f"wrote compact model to {args.output} (torch.save of the whole module)")
    if args.onnx:
        exported = graphprune.export_onnx(result.model, example, args.onnx)
        print(f"wrote ONNX to {args.onnx} (exporter: {exported.exporter})")
    if args.plot:
        from graphprune.export.report import plot_candidates

        print(f"wrote {plot_candidates(result, args.plot)}")
    if args.plot_widths:
        from graphprune.export.report import plot_widths

        print(f"wrote {plot_widths(model, result.model, args.plot_widths)}")
    return 0


def register(sub: Any) -> None:
    """Add ``sweep`` and ``target`` to the ``graphprune`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "sweep",
        help="compact at several ratios; params, FLOPs and onnxruntime latency of each",
        description="Analyse MODEL once, compact it at each ratio, and measure every compact model "
                    "in onnxruntime interleaved with the original. Prints a table; --plot draws "
                    "latency and speed-up (measured vs ideal from FLOPs) against the ratio.",
    )
    _model_args(p)
    p.add_argument("--ratios", type=_ratios, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                   help="comma-separated ratios (default 0,0.1,...,0.7)")
    p.add_argument("--round-to", type=parse_round_to, default="auto", metavar="N|auto",
                   help="kept widths: 'auto' (default, as compact), multiples of N, or 1 (exact)")
    p.add_argument("--no-latency", action="store_true", help="params and FLOPs only (no ONNX timing)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw latency / speed-up vs ratio to this PNG")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "target",
        help="search the ratio that meets a FLOPs / params / speed-up / latency target",
        description="Compact MODEL to a target. --flops/--params: fraction of the original kept "
                    "(met within --tolerance). --speedup/--latency-ms: every candidate is exported "
                    "to ONNX and timed in onnxruntime; the least-pruned one that meets the target "
                    "wins. Every candidate tried is printed.",
    )
    _model_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--flops", type=float, metavar="FRACTION", help="keep this fraction of the FLOPs")
    group.add_argument("--params", type=float, metavar="FRACTION", help="keep this fraction of the params")
    group.add_argument("--speedup", type=float, metavar="X", help="measured onnxruntime speed-up to reach")
    group.add_argument("--latency-ms", type=float, metavar="MS", help="measured latency to get under")
    p.add_argument("--round-to", type=_round_to, default="auto", metavar="N|auto|measured",
                   help="kept widths: 'auto' (default, as compact), multiples of N, 1 (exact), or "
                        "'measured': try auto/1/8/16/32, keep the fastest")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance (default 0.02)")
    p.add_argument("--max-candidates", type=int, default=8, help="most candidates timed (speed targets)")
    p.add_argument("--with-depth", action="store_true",
                   help="also try removing whole residual blocks: several block counts, each with "
                        "widths cut to the target, every mix timed; prints which mix won (docs/depth.md)")
    p.add_argument("--json", metavar="PATH", help="write the search (every candidate) as JSON")
    p.add_argument("--plan", metavar="PATH", help="write the chosen plan as JSON")
    p.add_argument("--output", metavar="PATH", help="torch.save the compact model")
    p.add_argument("--onnx", metavar="PATH", help="export the compact model to ONNX")
    p.add_argument("--plot", metavar="PNG", help="draw the candidates tried")
    p.add_argument("--plot-widths", metavar="PNG", help="draw per-layer widths before/after")
    p.set_defaults(func=cmd_target)
