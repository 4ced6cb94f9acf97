"""The ``graphprune`` command line: ``demo``, ``compact``, ``benchmark`` and ``plan``.

A thin layer over the public API. Its own job is only what a shell user cannot do from Python:
turning a MODEL argument into ``(model, example_input)`` and turning graphprune errors into a
one-line message with exit code 2 instead of a traceback.

MODEL is one of

* ``package.module:callable`` (or ``path/to/file.py:callable``): the callable is called with no
  arguments and returns a model, or a ``(model, example_input)`` pair;
* ``zoo:NAME``: a built-in model from ``graphprune.zoo`` (``graphprune zoo`` lists them;
  ``--size tiny|bench`` picks the size);
* a path to a file written by ``torch.save(model)``. Loading it runs pickle, which can execute
  arbitrary code: only load files you trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import graphprune
from graphprune.cli.calib import add_calibration_args, calibration_kwargs
from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import ATTENTION_MODES

PROG = "graphprune"


# ---------------------------------------------------------------------------------------------
# Resolving MODEL
# ---------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(
            f"--input-shape must be positive integers separated by commas, e.g. 1,3,224,224; "
            f"got {text!r}"
        )
    return shape


def load_model(
    spec: str, input_shape: tuple[int, ...] | None = None, size: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """Resolve a MODEL argument to ``(model, example_input)``; see the module docstring.

    ``input_shape`` (a random ``float32`` tensor of that shape, fixed seed) overrides any example
    input the spec provides; it is required when the spec provides none.
    """
    if spec.startswith("zoo:"):
        model, example = _load_zoo(spec[len("zoo:") :], size)
    elif Path(spec).is_file():
        model, example = _load_saved(Path(spec))
    elif ":" in spec:
        model, example = _load_callable(spec)
    elif spec.endswith((".pt", ".pth", ".pkl", ".bin")):
        raise InputError(f"no such file {spec!r} (MODEL)")
    else:
        raise InputError(
            f"cannot resolve MODEL {spec!r}: it is not an existing file, not 'module:callable' "
            f"and not 'zoo:NAME'. Examples: mypkg.models:build_resnet, ./model.pt, zoo:mlp."
        )
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module. A callable "
            f"must return a model or a (model, example_input) pair."
        )
    if input_shape is not None:
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(*input_shape, generator=gen)
    if example is None:
        raise InputError(
            f"MODEL {spec!r} comes without an example input: pass --input-shape, "
            f"e.g. --input-shape 1,3,224,224 (or let the callable return (model, example_input))."
        )
    return model.eval(), example


def _split_result(obj: Any) -> tuple[Any, Any]:
    """A factory may return a model or a ``(model, example_input)`` pair."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], torch.nn.Module):
        return obj[0], obj[1]
    return obj, None


def _load_zoo(name: str, size: str | None) -> tuple[Any, Any]:
    from graphprune import zoo

    if name not in zoo.names():
        raise InputError(
            f"unknown zoo model {name!r}; known: {', '.join(zoo.names())} (see 'graphprune zoo')"
        )
    size = size or "tiny"
    if size not in zoo.SIZES:
        raise InputError(f"--size must be one of {', '.join(zoo.SIZES)} for zoo models, got {size!r}")
    return _split_result(zoo.build(name, size))


def _load_saved(path: Path) -> tuple[Any, Any]:
    try:
        # weights_only=False unpickles arbitrary objects (the whole module): trusted files only.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a user-facing input error
        raise InputError(
            f"cannot load {str(path)!r} with torch.load: {type(exc).__name__}: {exc}. MODEL files "
            f"must be written with torch.save(model), and the model's class must be importable."
        ) from exc
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{str(path)!r} holds a state_dict, not a model: graphprune needs the architecture "
            f"too. Save with torch.save(model), or use a 'module:callable' that builds the model "
            f"and loads the weights."
        )
    return _split_result(obj)


def _load_callable(spec: str) -> tuple[Any, Any]:
    module_name, _, attr_path = spec.rpartition(":")
    if not module_name or not attr_path:
        raise InputError(f"MODEL {spec!r} must look like 'package.module:callable'")
    module = _import(module_name, spec)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{module_name!r} has no attribute {attr_path!r} (from MODEL {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return _split_result(obj)
    if not callable(obj):
        raise InputError(f"{spec!r} is neither a callable nor an nn.Module")
    return _split_result(obj())


def _import(module_name: str, spec: str) -> Any:
    """Import a dotted module name, or a ``.py`` file by path; the cwd is importable, as with -m."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InputError(f"no such file {module_name!r} (from MODEL {spec!r})")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise InputError(
                f"cannot import module {module_name!r} (from MODEL {spec!r}): {exc}. Check the "
                f"spelling, or run from the directory that contains it / add it to PYTHONPATH."
            ) from exc
        raise  # the user's module itself failed to import one of its dependencies


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
    return {
        "ratio": args.ratio,
        "importance": args.importance,
        "ignored_layers": tuple(args.ignore),
        "prune_hidden": args.prune_hidden,
        "attention": args.attention,
        "fallback": args.fallback,
        **calibration_kwargs(args),
    }


def _compact(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.nn.Module, Any]:
    """Load MODEL, make (or read) the plan, apply it. Returns ``(model, example, small, plan)``."""
    model, example = load_model(args.model, args.input_shape, args.size)
    if getattr(args, "from_plan", None):
        try:
            text = Path(args.from_plan).read_text()
        except OSError as exc:
            raise InputError(f"cannot read --from-plan file: {exc}") from exc
        plan = graphprune.Plan.from_json(text)
        small = graphprune.apply_plan(model, plan)
    else:  # one analysis gives both, and the compact model is verified against the plan
        small, plan = graphprune.compact_with_plan(model, example, **_plan_kwargs(args))
    return model, example, small, plan


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
    model, example, small, _plan = _compact(args)
    report = graphprune.benchmark(model, small, example, **_bench_kwargs(args))
    print(report)
    if getattr(args, "plot", None):
        from graphprune.export.report import plot_widths

        print(f"wrote {plot_widths(model, small, args.plot)}")
    if args.json:
        payload = {"model": args.model, "ratio": args.ratio, "report": _report_to_data(report)}
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

MODEL_HELP = (
    "model to compact: 'package.module:callable' (or 'file.py:callable') returning a model or "
    "(model, example_input); 'zoo:NAME' for a built-in model; or a file written by "
    "torch.save(model). Loading a file runs pickle, which can execute arbitrary code: "
    "only load files you trust."
)


EPILOG = """examples:
  graphprune demo
  graphprune compact mypkg.models:build_model --ratio 0.3 --onnx small.onnx --output small.pt
  graphprune compact model.pt --input-shape 1,3,224,224 --benchmark
  graphprune plan zoo:resnet18 --json plan.json
  graphprune compact zoo:resnet18 --from-plan plan.json --onnx small.onnx
"""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--ratio", type=_ratio, default=0.3,
                   help="fraction of the units of every prunable group to remove (default 0.3)")
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="shape of a random float32 example input, e.g. 1,3,224,224 (required "
                        "unless MODEL provides an example input)")
    p.add_argument("--size", default=None,
                   help="size of a zoo: model: 'tiny' (default, seconds) or 'bench' (real widths)")
    p.add_argument("--importance", choices=("l1", "l2"), default="l2",
                   help="channel importance criterion (default l2)")
    add_structure_args(p)
    add_calibration_args(p)
    p.add_argument("--fallback", choices=("freeze", "graph", "error"), default="freeze",
                   help="when a module's code cannot run at the new sizes: keep such modules whole "
                        "(default), return an fx GraphModule, or stop with an error")


def add_structure_args(p: argparse.ArgumentParser) -> None:
    """What may be pruned: shared by every sub-command that analyses a model."""
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="module name to keep whole (repeatable)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="also prune the residual stream (hidden size) of transformers")
    p.add_argument("--attention", choices=tuple(ATTENTION_MODES), default="heads",
                   help="what attention layers lose: whole heads (default), q heads within each "
                        "KV group, or channels inside every head (head_dim)")


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
    p.add_argument("--ratio", type=_ratio, default=0.5, help="pruning ratio (default 0.5)")
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
