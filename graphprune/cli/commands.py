"""The ``graphprune`` command line: ``demo``, ``compact``, ``benchmark`` and ``plan``.

A thin layer over the public API. Its own job is only what a shell user cannot do from Python:
turning a MODEL argument into ``(model, example_input)`` (``cli.common``) and turning graphprune
errors into a one-line message with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import graphprune
from graphprune.cli.calib import add_calibration_args, calibration_kwargs
from graphprune.cli.common import (
    MODEL_HELP,
    add_importance_arg,
    add_structure_args,
    load_model,
    parse_round_to,
    ratio_arg,
    shape_arg,
)
from graphprune.errors import GraphPruneError, InputError
from graphprune.methods.prune_masks import fold_masks

PROG = "graphprune"


# ---------------------------------------------------------------------------------------------
# Sub-commands
# ---------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _size_line(label: str, before: float, after: float) -> str:
    kept = after / before if before else 1.0
    return f"{label:<7} {_human(before):>9} -> {_human(after):>9}  ({kept:.1%} kept)"


def _plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    depth = getattr(args, "depth", None)
    kwargs: dict[str, Any] = {
        "ratio": args.ratio if args.ratio is not None else (0.0 if depth is not None else 0.3),
        "importance": args.importance,
        "ignored_layers": tuple(args.ignore),
        "prune_hidden": args.prune_hidden,
        "attention": args.attention,
        "fallback": args.fallback,
        "round_to": args.round_to,
        **calibration_kwargs(args),
    }
    if depth is not None:
        kwargs.update(depth=depth, depth_unit=args.depth_unit)
    return kwargs


def _compact(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.nn.Module, Any]:
    """Load MODEL, make (or read) the plan, apply it. Returns ``(model, example, small, plan)``."""
    model, example = load_model(args.model, args.input_shape, args.size)
    if getattr(args, "from_plan", None):
        try:
            text = Path(args.from_plan).read_text()
        except OSError as exc:
            raise InputError(f"cannot read --from-plan file: {exc}") from exc
        plan = graphprune.Plan.from_text(text, args.from_plan)  # the text, never a path in it
        small = graphprune.apply_plan(model, plan)
    else:  # one analysis gives both, and the compact model is verified against the plan
        small, plan = graphprune.compact_with_plan(model, example, **_plan_kwargs(args))
    # torch.nn.utils.prune masks: the dense model they compute (same outputs) is what is compared
    return fold_masks(model)[0], example, small, plan


def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.cli.demo import run_demo

    kwargs: dict[str, Any] = {}
    if args.quick:
        kwargs.update(epochs=3, finetune_epochs=1, bench_runs=5)
    if args.epochs is not None:  # explicit counts win over --quick
        kwargs["epochs"] = args.epochs
    if args.finetune_epochs is not None:
        kwargs["finetune_epochs"] = args.finetune_epochs
    run_demo(ratio=args.ratio, seed=args.seed, quiet=False, out_dir=args.out_dir, **kwargs)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, example, small, plan = _compact(args)
    print(plan)
    print()
    print(_size_line("params", graphprune.count_params(model), graphprune.count_params(small)))
    print(_size_line("FLOPs", graphprune.count_flops(model, example),
                     graphprune.count_flops(small, example)))
    print(f"compacted in {time.perf_counter() - t0:.1f}s")
    if args.plan:
        Path(args.plan).write_text(plan.to_json())
        print(f"wrote plan to {args.plan}")
    if args.output:
        torch.save(small, args.output)
        print(f"wrote compact model to {args.output} (torch.save of the whole module)")
    if args.onnx:
        result = graphprune.export_onnx(small, example, args.onnx)
        print(f"wrote ONNX to {args.onnx}" + _export_note(result))
    if args.benchmark:
        print()
        print(graphprune.benchmark(model, small, example, **_bench_kwargs(args)))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    model, example, small, plan = _compact(args)
    report = graphprune.benchmark(model, small, example, **_bench_kwargs(args))
    print(report)
    if getattr(args, "plot", None):
        from graphprune.export.report import plot_widths

        print(f"wrote {plot_widths(model, small, args.plot)}")
    if args.json:
        ratio = args.ratio if args.ratio is not None or args.importance == "mask" else plan.ratio
        payload = {"model": args.model, "ratio": ratio, "report": _report_to_data(report)}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    model, example = load_model(args.model, args.input_shape, args.size)
    plan = graphprune.make_plan(model, example, **_plan_kwargs(args))
    print(plan)
    if args.json:
        Path(args.json).write_text(plan.to_json())
        print(f"wrote plan to {args.json}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from graphprune import zoo

    families = {
        **dict.fromkeys(zoo.CNN_NAMES, "CNN"),
        **dict.fromkeys(zoo.MLP_NAMES, "MLP"),
        **dict.fromkeys(zoo.ATTENTION_NAMES, "attention"),
        **dict.fromkeys(zoo.HF_CNN_NAMES, "Hugging Face CNN"),
    }
    for name in zoo.names():
        line = families.get(name, "")
        if args.describe:  # builds every model: seconds, plus the transformers import
            try:
                line = zoo.describe(zoo.build(name, args.size)[0])
            except ImportError as exc:  # Hugging Face entries need transformers
                line = f"unavailable: {exc}"
        print(f"zoo:{name:<16} {line}")
    return 0


def _bench_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {}
    if args.runs is not None:
        kwargs["runs"] = args.runs
    if args.warmup is not None:
        kwargs["warmup"] = args.warmup
    return kwargs


def _export_note(result: Any) -> str:
    exporter = getattr(result, "exporter", None)
    return f" (exporter: {exporter})" if exporter else ""


def _report_to_data(report: Any) -> Any:
    """Best JSON-able view of a BenchmarkReport: its own to_dict/to_json, else its fields."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if hasattr(report, "to_json"):
        return json.loads(report.to_json())
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return {"table": str(report)}


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------



EPILOG = """examples:
  graphprune demo
  graphprune compact mypkg.models:build_model --ratio 0.3 --onnx small.onnx --output small.pt
  graphprune compact model.pt --input-shape 1,3,224,224 --benchmark
  graphprune plan zoo:resnet18 --json plan.json
  graphprune compact zoo:resnet18 --from-plan plan.json --onnx small.onnx
"""


def _depth(text: str) -> int | float:
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth must be a fraction or a count, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--ratio", type=ratio_arg, default=None,
                   help="fraction of the units of every prunable group to remove (default 0.3, or 0 "
                        "with --depth; with --importance mask an upper bound, default none)")
    p.add_argument("--depth", type=_depth, default=None, metavar="D",
                   help="remove whole residual blocks first: a fraction of the removable blocks "
                        "(0.25) or a count (2); see docs/depth.md")
    p.add_argument("--depth-unit", choices=("module", "branch"), default="module",
                   help="a block is the module doing the residual adds (a decoder layer, default) "
                        "or one residual branch (an attention or MLP sub-layer)")
    p.add_argument("--input-shape", type=shape_arg, metavar="SHAPE",
                   help="shape of a random float32 example input, e.g. 1,3,224,224 (required "
                        "unless MODEL provides an example input)")
    p.add_argument("--size", default=None,
                   help="size of a zoo: model: 'tiny' (default, seconds) or 'bench' (real widths)")
    add_importance_arg(p)
    add_structure_args(p)
    p.add_argument("--round-to", type=parse_round_to, default="auto", metavar="N|auto",
                   help="kept widths: 'auto' (default) rounds each group to the width multiple "
                        "onnxruntime's CPU kernels run well (16 for conv channels), N = multiples "
                        "of N, 1 = exactly round(ratio * units)")
    add_calibration_args(p)
    p.add_argument("--fallback", choices=("freeze", "whole", "graph", "error"), default="freeze",
                   help="when a module's code cannot run at the new sizes: rewrite only such modules "
                        "as graphs where exact, else keep them whole (default, docs/rewrite.md); keep "
                        "them whole; return an fx GraphModule; or stop with an error")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, help="timed onnxruntime runs per model")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs per model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structured pruning that makes PyTorch models physically smaller and "
                    "measurably faster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {graphprune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small CNN on sklearn digits, compact it, benchmark it",
                       description="Train a small CNN on scikit-learn's bundled digits (no "
                                   "download), compact it, fine-tune briefly, export both models "
                                   "to ONNX and print the before/after table.")
    p.add_argument("--ratio", type=ratio_arg, default=0.5, help="pruning ratio (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after compaction")
    p.add_argument("--quick", action="store_true",
                   help="very short training and benchmark (a smoke test, not a result)")
    p.add_argument("--out-dir", help="keep the two ONNX files in this directory")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compact", help="compact a model; print the plan and sizes",
                       description="Compact MODEL and print the plan and its size before/after.")
    _add_model_args(p)
    p.add_argument("--onnx", metavar="PATH", help="export the compact model to this ONNX file")
    p.add_argument("--output", metavar="PATH",
                   help="torch.save the compact model (whole module) to this file")
    p.add_argument("--plan", metavar="PATH", help="write the plan as JSON to this file")
    p.add_argument("--from-plan", metavar="PATH",
                   help="apply this saved plan (from 'graphprune plan --json') instead of "
                        "making one; --ratio/--importance/--ignore are then unused")
    p.add_argument("--benchmark", action="store_true",
                   help="also measure both models in onnxruntime and print the table")
    _add_bench_args(p)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("benchmark", help="compact a model and measure both in onnxruntime",
                       description="Compact MODEL and print params, FLOPs and onnxruntime latency "
                                   "of both models.")
    _add_model_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw per-layer widths before/after to this PNG")
    _add_bench_args(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("plan", help="analyse a model and print the plan (changes nothing)",
                       description="Analyse MODEL and print which channels would be removed and "
                                   "which groups are left alone, and why.")
    _add_model_args(p)
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON to this file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("zoo", help="list the built-in models usable as MODEL 'zoo:NAME'")
    p.add_argument("--describe", action="store_true", help="build each model and show its size")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny", help="size for --describe")
    p.set_defaults(func=cmd_zoo)

    from graphprune.cli.speed import register as register_speed_commands

    register_speed_commands(sub)  # sweep, target
    from graphprune.cli.checkpoint import register as register_checkpoint_command

    register_checkpoint_command(sub)  # checkpoint
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 usage or graphprune error) instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except GraphPruneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output path in a directory that does not exist
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
