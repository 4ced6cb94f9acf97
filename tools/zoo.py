"""The model zoos, graphprune vs Torch-Pruning: every torchvision classifier, one timm model per family.

    python tools/zoo.py [--set torchvision|timm|all] [--models a,b,c] [--jobs N] [--timeout S]
                        [--ratio 0.3] [--no-speed] [--json OUT] [--markdown OUT]
    python tools/zoo.py --list [--set ...]          # the model names
    python tools/zoo.py --refresh-timm-sample       # rebuild tools/zoo_timm_sample.txt

Which models and input sizes: see tools/zoo_models.py. Needs torchvision and timm importable
(DEVELOPERS.md says how); never a graphprune dependency.

Every (model, tool) pair runs in a fresh Python process (``--worker``), so the first call is
*cold* the way a user's first call is. In that process, untimed: import torch, timm/torchvision,
the tool, build the model, count its parameters and FLOPs. Timed: ``cold`` is the first
compaction call (graphprune: ``graphprune.compact_with_plan(model, x, ratio)``, which runs the
same code as ``compact`` with its defaults, ``verify=True`` included, and also returns the plan
whose boundaries and notes say what was kept whole; Torch-Pruning: tools/tp_baseline.py's
documented recipe, ``prune_with_tp``, on a deep copy made before the clock starts; where whole-head
pruning fails on an attention model the ViT example's head-dim recipe is tried next and the cold
time is the sum of both tries, what a user following the docs pays; TP's timed span also holds one
forward pass that checks the result, which decides whether the next recipe is needed). ``warm`` is
a second call in the same process on a fresh deep copy of the original (the recipe that worked,
for TP).

A result counts as ok only if the call did not raise, the pruned model runs, every output keeps
its shape and the parameter count went down (compare.check_pruned). Then: params and FLOPs kept
(fractions, graphprune.count_params / count_flops for both tools), and unless ``--no-speed`` the
onnxruntime speed-up: original and pruned model exported, the onnxruntime outputs compared with
torch's, and timed interleaved in that same worker (compare.py's measuring code, 1 thread).

"Kept whole" (graphprune only; TP reports nothing comparable): what graphprune itself says: its
warnings (``fallback="freeze"`` keeping modules whole, a GraphModule returned instead of the
user's class), the plan's ``boundaries`` (ops without a rule, whose channels stay) and ``notes``,
including why the rewrite as graphs (docs/rewrite.md) was declined where it was tried
("not rewritten as graphs: ..."), which the table shows after what was kept whole. The plan's
notes about rewriting are also kept whole in ``rewrite_notes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, no install
sys.path.insert(0, str(HERE))

TOOLS = ("graphprune", "torch-pruning")
RESULT_TAG = "ZOO-RESULT "


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Worker: one model, one tool, one fresh process
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The error's type and first line, shortened to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _gp_call(model: Any, x: Any, ratio: float) -> tuple[Any, list[str], Any]:
    """One graphprune call; its own warnings (those pointing outside torch/timm) come back."""
    import graphprune

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        small, plan = graphprune.compact_with_plan(model, x, ratio)
    ours = [str(w.message).splitlines()[0] for w in caught if "graphprune" in str(w.message)]
    return small, list(dict.fromkeys(ours)), plan


def gp_record(plan: Any, warnings_seen: list[str]) -> dict[str, list[str]]:
    """What graphprune says it kept whole, rewrote as graphs, and why, from its plan and warnings.

    Shortest first: the plan's note names the modules kept whole; the freeze warning says the
    same at length; then any other warning; then the ops without a rule. Submodules rewritten as
    graphs (docs/rewrite.md) are pruned, not kept whole; when the rewrite was tried and declined,
    the plan's note says why ("not rewritten as graphs: ..."), kept with what was kept whole.
    """
    whole = [n for n in plan.notes if "kept whole" in n or n.startswith(NOT_REWRITTEN)]
    whole += [f"warning: {n}" for n in warnings_seen
              if not (whole and "kept whole" in n) and REWRITTEN not in n]
    whole += [f"boundary: {b}" for b in plan.boundaries]
    return {"kept_whole": list(dict.fromkeys(whole)),
            "rewritten": [r["module"] for r in getattr(plan, "rewrites", [])],
            "rewrite_notes": [n for n in plan.notes if REWRITTEN in n]}


def _tp_call(model: Any, x: Any, ratio: float, modes: tuple[str, ...], ref: Any) -> tuple[Any, str]:
    """Torch-Pruning's recipe, head modes in order; returns the model and the mode that worked."""
    from compare import check_pruned
    from tp_baseline import prune_with_tp

    errors = []
    for mode in modes:
        work = copy.deepcopy(model)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                small = prune_with_tp(work, x, ratio, head_mode=mode)
            check_pruned(small, x, ref.shapes, ref.params)
            return small, mode
        except Exception as exc:
            errors.append(f"{mode}: {_first_line(exc, 150)}" if len(modes) > 1 else _first_line(exc))
    raise RuntimeError(" | ".join(errors))


def _speed(model: Any, small: Any, x: Any, name: str, out: dict[str, Any]) -> None:
    from compare import OrtModel, export, onnx_mismatch, time_interleaved

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for key, mdl in (("original", model), ("pruned", small)):
            path = os.path.join(tmp, f"{name}.{key}.onnx")
            export(mdl, x, path)
            sessions[key] = OrtModel(path, x, threads=1)
            err = onnx_mismatch(sessions[key], mdl, x)
            out[f"onnx_err_{key}"] = err
        medians, _ = time_interleaved(sessions, runs=30, warmup=3, budget_s=8.0, min_runs=5)
    out["latency_ms_original"], out["latency_ms_pruned"] = medians["original"], medians["pruned"]
    out["speedup"] = medians["original"] / medians["pruned"]


def _flops(model: Any, x: Any, out: dict[str, Any], key: str) -> int | None:
    """graphprune.count_flops, or None with the error recorded: a FLOP count that fails (torch's
    FlopCounterMode on some timm models) must not hide whether the model compacts."""
    from compare import count_flops

    try:
        return count_flops(model, x)
    except Exception as exc:
        out[key] = _first_line(exc, 160)
        return None


def worker(name: str, tool: str, ratio: float, speed: bool) -> dict[str, Any]:
    """Measure one (model, tool) pair in this process; see the module docstring."""
    out: dict[str, Any] = {"model": name, "tool": tool, "ok": False, "error": "", "kept_whole": []}
    import torch

    torch.set_num_threads(1)
    from compare import Reference, check_pruned, count_params, output_shapes
    from zoo_models import build

    try:
        model, x = build(name)
        out["input"] = list(x.shape)
        params, flops = count_params(model), _flops(model, x, out, "flops_error")
        ref = Reference(output_shapes(model, x), params)
        out.update(params=params, flops=flops)
    except Exception as exc:
        out["error"] = f"could not build/run the original: {_first_line(exc)}"
        return out
    if tool == "graphprune":
        import graphprune  # noqa: F401 - imported before the clock starts
    else:
        import torch_pruning  # noqa: F401
        from tp_baseline import HEAD_MODES, has_attention
    try:
        work = copy.deepcopy(model)
        t0 = time.perf_counter()
        if tool == "graphprune":
            small, notes, plan = _gp_call(work, x, ratio)
            out["cold_s"] = time.perf_counter() - t0
            # recorded before the check, so a "no parameters removed" failure says why
            out.update(gp_record(plan, notes))
            out["class"] = type(small).__name__
            check_pruned(small, x, ref.shapes, ref.params)
            again = copy.deepcopy(model)
            t0 = time.perf_counter()
            _gp_call(again, x, ratio)
            out["warm_s"] = time.perf_counter() - t0
        else:
            modes = HEAD_MODES if has_attention(model) else HEAD_MODES[:1]
            small, mode = _tp_call(model, x, ratio, modes, ref)
            out["cold_s"] = time.perf_counter() - t0
            out["tp_mode"] = mode
            t0 = time.perf_counter()
            _tp_call(model, x, ratio, (mode,), ref)
            out["warm_s"] = time.perf_counter() - t0
    except Exception as exc:
        out["cold_s"] = out.get("cold_s", time.perf_counter() - t0)
        out["error"] = _first_line(exc)
        return out
    small.eval()
    out["ok"] = True
    out["params_kept"] = count_params(small) / params
    small_flops = _flops(small, x, out, "flops_error_pruned")
    out["flops_kept"] = small_flops / flops if flops and small_flops is not None else None
    if speed:
        try:
            _speed(model, small, x, name, out)
        except Exception as exc:
            out["speed_error"] = _first_line(exc, 120)
    return out


# --------------------------------------------------------------------------------------------
# Driver: a fresh process per (model, tool), a timeout each
# --------------------------------------------------------------------------------------------


def run_pair(name: str, tool: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, name, "--ratio",
           str(args.ratio)] + (["--no-speed"] if args.no_speed else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "tool": tool, "ok": False, "kept_whole": [],
                "error": f"timed out after {args.timeout:.0f}s (whole process)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["process_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"model": name, "tool": tool, "ok": False, "kept_whole": [],
            "error": f"worker died (exit {proc.returncode}): {tail[:200]}"}


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _tool_cell(r: dict[str, Any] | None, speed: bool) -> list[str]:
    if r is None:
        return ["", "", "", "", "", ""] if speed else ["", "", "", "", ""]
    if not r["ok"]:
        cells = ["FAIL: " + r["error"].replace("|", "/")[:120], "", "", _f(r.get("cold_s"), ".2f"), ""]
    else:
        cells = ["ok", _f(r.get("params_kept"), ".2f"), _f(r.get("flops_kept"), ".2f"),
                 _f(r.get("cold_s"), ".2f"), _f(r.get("warm_s"), ".2f")]
    if speed:
        cells.append(_f(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""))
    return cells


REWRITTEN = "rewritten as graphs"  # graphprune's warning when submodules were rewritten, not frozen
NOT_REWRITTEN = "not rewritten as graphs"  # the plan's note when the rewrite was tried and declined


def kept_whole(r: dict[str, Any]) -> list[str]:
    """What graphprune kept whole (older result files also listed the rewrite warning there)."""
    return [k for k in r.get("kept_whole", []) if REWRITTEN not in k or k.startswith(NOT_REWRITTEN)]


def why_not_rewritten(r: dict[str, Any]) -> str:
    """Why graphprune kept modules whole instead of rewriting them as graphs ('' if not recorded)."""
    why = [k for k in r.get("kept_whole", []) if k.startswith(NOT_REWRITTEN)]
    return why[0].removeprefix(NOT_REWRITTEN).lstrip(": ") if why else ""


def rewritten(r: dict[str, Any]) -> int:
    """How many submodules graphprune rewrote as graphs (pruned, the user's class kept)."""
    if "rewritten" in r:
        return len(r["rewritten"])
    return sum(1 for k in r.get("kept_whole", []) if REWRITTEN in k)  # older files: 1 = some


def whole_cell(r: dict[str, Any] | None) -> str:
    """The table's "gp kept whole" cell: the first thing kept whole, how many more, and why the
    rewrite as graphs was declined when it was."""
    if not r or not kept_whole(r):
        return ""
    why = why_not_rewritten(r)
    entries = [k for k in kept_whole(r) if not k.startswith(NOT_REWRITTEN)] or kept_whole(r)
    first = entries[0].replace("|", "/")
    more = len(entries) - 1
    cell = (first[:160] + ("..." if len(first) > 160 else "")) + (f" (+{more} more)" if more else "")
    if why:
        cell += f"; not rewritten as graphs: {why.replace('|', '/')[:160]}"
    return cell


def totals(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Models ok per tool, median cold time per tool, median gp/TP cold ratio on models both handle."""
    out: dict[str, Any] = {"models": len(results)}
    for tool in TOOLS:
        done = [r[tool] for r in results.values() if tool in r]
        oks = [r for r in done if r["ok"]]
        out[tool] = {"ok": len(oks), "run": len(done)}
        for key in ("cold_s", "warm_s", "params_kept"):
            out[tool][f"median_{key}"] = statistics.median([r[key] for r in oks]) if oks else None
    both = [r for r in results.values() if all(t in r and r[t]["ok"] for t in TOOLS)]
    out["both_ok"] = len(both)
    ratios = [r["graphprune"]["cold_s"] / r["torch-pruning"]["cold_s"] for r in both]
    warm = [r["graphprune"]["warm_s"] / r["torch-pruning"]["warm_s"] for r in both]
    out["median_cold_ratio_gp_tp"] = statistics.median(ratios) if ratios else None
    out["median_warm_ratio_gp_tp"] = statistics.median(warm) if warm else None
    gp_ok = [r["graphprune"] for r in results.values() if r.get("graphprune", {}).get("ok")]
    out["gp_kept_whole"] = sum(1 for r in gp_ok if kept_whole(r))
    out["gp_rewritten"] = sum(1 for r in gp_ok if rewritten(r))
    return out


def markdown(results: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    speed = not args.no_speed
    cols = ["result", "params kept", "FLOPs kept", "cold s", "warm s"] + (["speed-up"] if speed else [])
    head = ["model", "input"] + [f"gp {c}" for c in cols] + [f"TP {c}" for c in cols] + ["gp/TP cold",
                                                                                         "gp kept whole"]
    lines = [f"ratio {args.ratio}; each (model, tool) in a fresh process; times are the compaction "
             "call only (cold: first call, warm: second call on a fresh copy); "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} when written",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(results):
        r = results[name]
        gp, tp = r.get("graphprune"), r.get("torch-pruning")
        shape = (gp or tp or {}).get("input")
        ratio = (gp["cold_s"] / tp["cold_s"] if gp and tp and gp["ok"] and tp["ok"] else None)
        row = [name, "x".join(map(str, shape[-2:])) if shape else ""] + _tool_cell(gp, speed)
        row += _tool_cell(tp, speed) + [_f(ratio, ".1f"), whole_cell(gp)]
        lines.append("| " + " | ".join(row) + " |")
    t = totals(results)
    gp, tp = t["graphprune"], t["torch-pruning"]
    lines += ["", f"**Totals** ({t['models']} models): graphprune ok {gp['ok']}/{gp['run']}, "
              f"Torch-Pruning ok {tp['ok']}/{tp['run']}; median cold compaction time: graphprune "
              f"{_f(gp['median_cold_s'], '.2f')} s, Torch-Pruning {_f(tp['median_cold_s'], '.2f')} s; "
              f"median gp/TP cold time ratio on the {t['both_ok']} models both handle: "
              f"{_f(t['median_cold_ratio_gp_tp'], '.2f')} (warm: {_f(t['median_warm_ratio_gp_tp'], '.2f')}); "
              f"graphprune kept something whole on {t['gp_kept_whole']} of its {gp['ok']} ok models "
              f"and rewrote submodules as graphs on {t['gp_rewritten']}; "
              f"median params kept: graphprune {_f(gp['median_params_kept'], '.2f')}, Torch-Pruning "
              f"{_f(tp['median_params_kept'], '.2f')}."]
    return "\n".join(lines + [""] + watch_list(results)) + "\n"


def watch_list(results: dict[str, dict[str, dict[str, Any]]], slowest: int = 15) -> list[str]:
    """The models that need work: graphprune failing, partly pruned, slowest relative to TP."""
    gp = {n: r["graphprune"] for n, r in sorted(results.items()) if "graphprune" in r}
    tp = {n: r["torch-pruning"] for n, r in results.items() if "torch-pruning" in r}
    fails = [f"- {n}: {g['error']}" + (f" [{whole_cell(g)}]" if kept_whole(g) else "")
             for n, g in gp.items() if not g["ok"]]
    whole = [f"- {n}: {whole_cell(g)}" for n, g in gp.items() if g["ok"] and kept_whole(g)]
    graphs = [f"- {n}" for n, g in gp.items() if g["ok"] and rewritten(g)]
    ratios = sorted(((g["cold_s"] / tp[n]["cold_s"], n) for n, g in gp.items()
                     if g["ok"] and n in tp and tp[n]["ok"]), reverse=True)
    slow = [f"- {n}: {r:.1f}x ({gp[n]['cold_s']:.1f} s vs {tp[n]['cold_s']:.1f} s cold, "
            f"warm {gp[n]['warm_s']:.1f} s vs {tp[n]['warm_s']:.1f} s)" for r, n in ratios[:slowest]]
    tp_only = [f"- {n}" for n, g in gp.items() if not g["ok"] and n in tp and tp[n]["ok"]]
    return ([f"**graphprune fails ({len(fails)})**", *fails, "",
             f"of which Torch-Pruning handles ({len(tp_only)})", *tp_only, "",
             f"**graphprune kept something whole ({len(whole)})**", *whole, "",
             f"**graphprune rewrote submodules as graphs ({len(graphs)})**", *graphs, "",
             f"**slowest relative to Torch-Pruning (cold gp/TP, top {slowest})**", *slow])


def _write(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Rewrite the outputs after every model, so a long run can be read (or killed) midway."""
    if args.json:
        payload = {"ratio": args.ratio, "speed": not args.no_speed, "totals": totals(results),
                   "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, args))


def select(args: argparse.Namespace) -> list[str]:
    from zoo_models import timm_names, torchvision_names

    if args.models:
        return [m.strip() for m in args.models.split(",") if m.strip()]
    names = []
    if args.set in ("torchvision", "all"):
        names += torchvision_names()
    if args.set in ("timm", "all"):
        names += timm_names()
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=("torchvision", "timm", "all"), default="all")
    p.add_argument("--models", default="", help="comma-separated tv_*/timm_* names (overrides --set)")
    p.add_argument("--tools", default=",".join(TOOLS), help="graphprune,torch-pruning (default both)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes at once (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per (model, tool) process")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--no-speed", action="store_true", help="skip the onnxruntime export and timing")
    p.add_argument("--json", default="", help="write per-model results and totals here")
    p.add_argument("--markdown", default="", help="write the markdown table here (else stdout)")
    p.add_argument("--list", action="store_true", help="print the model names and exit")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="no run: merge these --json files (later ones win) into one --markdown report")
    p.add_argument("--refresh-timm-sample", action="store_true",
                   help="rebuild tools/zoo_timm_sample.txt from the installed timm (minutes)")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        tool, name = args.worker
        res = worker(name, tool, args.ratio, not args.no_speed)
        print(RESULT_TAG + json.dumps(res, default=str), flush=True)
        return 0
    if args.refresh_timm_sample:
        from zoo_models import refresh_timm_sample

        for module, name, params in refresh_timm_sample():
            print(module, name, params)
        return 0
    if args.report:
        merged: dict[str, Any] = {}
        speed = False
        for path in args.report:
            with contextlib.suppress(FileNotFoundError):
                payload = json.loads(Path(path).read_text())
                for model, by_tool in payload["results"].items():  # per tool: reruns of one side
                    merged.setdefault(model, {}).update(by_tool)
                speed = speed or payload["speed"]
        args.no_speed = args.no_speed or not speed  # a speed-up column when any file has one
        text = markdown(merged, args)
        Path(args.markdown).write_text(text) if args.markdown else print(text)
        return 0
    names = select(args)
    if args.list:
        print("\n".join(names))
        return 0
    from precompile import compile_packages
    from tqdm import tqdm

    compile_packages("graphprune", "torch_pruning")  # both start from what an install holds
    tools = [t for t in args.tools.split(",") if t]
    pairs = [(n, t) for n in names for t in tools]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm(total=len(pairs), desc="zoo",
                                                             file=sys.stderr) as bar:
        futures = [pool.submit(run_pair, n, t, args) for n, t in pairs]
        for fut in futures:
            res = fut.result()
            results.setdefault(res["model"], {})[res["tool"]] = res
            bar.set_postfix_str(f"{res['model']} {res['tool']} {'ok' if res['ok'] else 'FAIL'}")
            bar.update()
            _write(results, args)
    if not args.markdown:
        print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
