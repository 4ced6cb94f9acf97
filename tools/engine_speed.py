"""How fast and light is the engine itself? Time trace / group / plan / surgery per model.

Targets (issue "Measured speed"): a ResNet-50-sized CNN in under 2 s, a ViT-B / BERT-base-sized
model in under 5 s, a LLaMA-style 7B model built on the ``meta`` device analysed to a plan in
under 60 s and 4 GiB of RAM, and analysis cost growing linearly with depth.

Every case runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own and a warm
cache from an earlier case cannot flatter it. Each case runs the pipeline twice: the first
("cold") pays one-time costs of torch.export in a fresh process (what a user's first call
costs), the second ("warm") shows the steady state.

    python tools/engine_speed.py                   # every case, table + JSON on stdout
    python tools/engine_speed.py --cases resnet50 --profile   # cProfile hotspots per stage
    python tools/engine_speed.py --json out.json   # also save the numbers
    python tools/engine_speed.py --twin            # meta plan == real plan on a small LLaMA
    python tools/engine_speed.py --llm tinyllama --calib 32 --workdir /tmp/gp   # real weights
                                                   # and a sharded checkpoint, see ``llm_cases``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

STAGES = ("trace", "group", "plan", "surgery")
DEPTHS = (2, 4, 8, 16, 32)
CASES: dict[str, dict[str, Any]] = {
    "resnet50": {"target_s": 2.0, "what": "zoo ResNet-50 (25.6 M params), 1x3x224x224"},
    "vit_b": {"target_s": 5.0, "what": "HF ViT-B/16 (86 M params, random weights), 1x3x224x224"},
    "bert_base": {"target_s": 5.0, "what": "HF BERT-base (110 M params, random weights), 1x128 tokens"},
    "llama7b_meta": {
        "target_s": 60.0,
        "target_gib": 4.0,
        "what": "LLaMA-7B config (6.7 B params) on the meta device, 1x16 tokens",
    },
    **{
        f"llama_meta_L{n}": {"what": f"LLaMA-7B widths, {n} blocks, meta device", "depth": n}
        for n in DEPTHS
    },
}


def _rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _llama_config(layers: int, small: bool = False) -> Any:
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=256,
                           max_position_embeddings=64, attn_implementation="eager")
    # LLaMA-2-7B shapes, the config's defaults (SDPA attention): graphprune never runs a meta
    # model on meta tensors (fake tensors where it must run it), so HF's .item() checks pass.
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=2048)


def build(case: str) -> tuple[torch.nn.Module, Any]:
    """The model and example input of a case (random weights; no downloads)."""
    torch.manual_seed(0)
    if case == "resnet50":
        from graphprune import zoo

        return zoo.build("resnet50", "bench")
    if case == "vit_b":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()
        return model, torch.randn(1, 3, 224, 224)
    if case == "bert_base":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig()).eval()
        ids = torch.randint(0, 30522, (1, 128))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if case.startswith("llama"):
        from transformers import LlamaForCausalLM

        layers = CASES[case].get("depth", 32)
        with torch.device("meta"):
            model = LlamaForCausalLM(_llama_config(layers))
        model.eval()
        return model, {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")}
    raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def pipeline(model: torch.nn.Module, x: Any, ratio: float, profile: bool) -> dict[str, Any]:
    """Run the four stages once; seconds per stage (and cProfile hotspots if asked)."""
    from graphprune.engine import realize
    from graphprune.graph.analysis import analyze_traced
    from graphprune.graph.copies import eval_copy
    from graphprune.graph.trace import trace
    from graphprune.planning.importance import resolve
    from graphprune.planning.plan import build_plan

    out: dict[str, Any] = {}
    hot: dict[str, str] = {}
    state: dict[str, Any] = {}

    def stage(name: str, fn: Any) -> None:
        prof = cProfile.Profile() if profile else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        state[name] = fn()
        if prof:
            prof.disable()
        out[name] = time.perf_counter() - t0
        out[name + "_cpu"] = time.process_time() - c0
        if prof:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            hot[name] = buf.getvalue()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage("trace", lambda: (lambda w: (trace(w, x), w))(eval_copy(model)))
        traced, work = state["trace"]
        stage("group", lambda: analyze_traced(traced, work))
        analysis = state["group"]
        stage("plan", lambda: build_plan(analysis, ratio, resolve("l2"), "l2"))
        plan = state["plan"]
        stage("surgery", lambda: realize(analysis, plan, x)[0])
    out["total"] = sum(out[s] for s in STAGES)
    out["total_cpu"] = sum(out[s + "_cpu"] for s in STAGES)
    out["groups"] = len(analysis.groups)
    out["pruned_groups"] = sum(1 for g in plan.groups if g.removed)
    out["graph_nodes"] = len(traced.program.graph.nodes)
    out["result_class"] = type(state["surgery"]).__name__
    config = getattr(state["surgery"], "config", None)
    if config is not None:  # Hugging Face: the config should describe the compact widths
        keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        out["config_after"] = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    if profile:
        out["hotspots"] = hot
    return out


def run_case(case: str, ratio: float, profile: bool) -> dict[str, Any]:
    """One case in this process: build, then the pipeline cold and warm."""
    from graphprune.export.bench import count_params

    rss0 = _rss_gib()
    t0 = time.perf_counter()
    model, x = build(case)
    built = time.perf_counter() - t0
    res: dict[str, Any] = {"case": case, **CASES[case], "build_s": built, "params": count_params(model)}
    res["cold"] = pipeline(model, x, ratio, profile)
    res["warm"] = pipeline(model, x, ratio, False)
    res["peak_rss_gib"] = _rss_gib()
    res["loadavg_1min"] = os.getloadavg()[0]  # other processes on the machine inflate wall times
    res["rss_before_build_gib"] = rss0
    return res


def twin_check() -> dict[str, Any]:
    """A plan made on the meta twin equals the plan made on the real-weights model.

    Scores need weights, so both use the same seeded random importance; what is compared is
    the structure (groups, sliced tensors, kept indices, attribute updates). Then the meta
    twin's plan is replayed (``apply_plan``) on the real model and checked against compacting
    the real model directly: identical outputs, and ``generate`` still works.
    """
    from transformers import LlamaForCausalLM

    import graphprune
    from graphprune.planning.importance import random_importance

    cfg = _llama_config(2, small=True)
    torch.manual_seed(0)
    real = LlamaForCausalLM(cfg).eval()
    with torch.device("meta"):
        twin = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    x_real = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x_meta = {k: v.to("meta") for k, v in x_real.items()}
    crit = random_importance(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_real = graphprune.make_plan(real, x_real, 0.5, importance=crit)
        p_meta = graphprune.make_plan(twin, x_meta, 0.5, importance=crit)
        d_real, d_meta = p_real.to_dict(), p_meta.to_dict()
        same = {k: d_real[k] == d_meta[k] for k in ("slices", "shapes", "groups", "attr_updates")}
        replayed = graphprune.apply_plan(real, p_meta)
        direct = graphprune.compact(real, x_real, 0.5, importance=crit)
        with torch.no_grad():
            a = replayed(**x_real).logits
            b = direct(**x_real).logits
        gen = replayed.generate(ids, max_new_tokens=4, do_sample=False)
    return {
        "plans_equal": same,
        "replayed_vs_direct_max_abs_diff": float((a - b).abs().max()),
        "params_real": graphprune.count_params(real),
        "params_compact": graphprune.count_params(replayed),
        "generate_tokens": gen.shape[-1] - ids.shape[-1],
        "config_after_apply_plan": _config(replayed),
        "config_after_compact": _config(direct),
    }


def _config(model: torch.nn.Module) -> dict[str, Any]:
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {k: getattr(model.config, k, None) for k in keys}


def _fmt_row(r: dict[str, Any], which: str) -> str:
    s = r[which]
    tgt = r.get("target_s")
    verdict = "" if tgt is None else ("ok" if s["total"] < tgt else "SLOW")
    return (
        f"{r['case']:<15} {which:<5} " + " ".join(f"{s[k]:7.2f}" for k in STAGES)
        + f" {s['total']:7.2f} {s['total_cpu']:7.2f} {'' if tgt is None else f'{tgt:5.0f}':>6} {verdict:<4}"
        + f" {r['peak_rss_gib']:6.2f} {s['groups']:6d} {s['graph_nodes']:6d} {r['loadavg_1min']:5.1f}"
    )


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'case':<15} {'run':<5} " + " ".join(f"{s:>7}" for s in STAGES)
            + f" {'total':>7} {'cpu':>7} {'target':>6} {'':<4} {'RSSGiB':>6} {'groups':>6} {'nodes':>6}"
            + f" {'load':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines += [_fmt_row(r, "cold"), _fmt_row(r, "warm")]
    return "\n".join(lines)


def scaling(results: list[dict[str, Any]]) -> str:
    """Analysis (trace + group) cost per block, wall and CPU seconds, warm runs."""
    rows = [r for r in results if r.get("depth")]
    if len(rows) < 2:
        return ""
    rows.sort(key=lambda r: r["depth"])

    def cost(r: dict[str, Any], suffix: str) -> float:
        return r["warm"]["trace" + suffix] + r["warm"]["group" + suffix]

    lines = ["analysis (trace + group) vs depth, warm run:",
             f"{'blocks':>6} {'wall s':>8} {'cpu s':>8} {'cpu s/block':>12}"]
    for r in rows:
        lines.append(f"{r['depth']:>6} {cost(r, ''):8.2f} {cost(r, '_cpu'):8.2f} "
                     f"{cost(r, '_cpu') / r['depth']:12.3f}")
    a, b = rows[0], rows[-1]
    lines.append(
        f"{b['depth'] // a['depth']}x the blocks -> {cost(b, '') / cost(a, ''):.1f}x the wall time, "
        f"{cost(b, '_cpu') / cost(a, '_cpu'):.1f}x the CPU time (linear: {b['depth'] / a['depth']:.0f}x; "
        "a fixed cost per model makes it less)"
    )
    return "\n".join(lines)


LLM_TOOLS = ("graphprune-inplace", "graphprune", "torch-pruning")


def llm_cases(shape: str, ratio: float, calib: int, workdir: str, shard_gib: float,
              tools: tuple[str, ...] = LLM_TOOLS) -> list[dict[str, Any]]:
    """End-to-end LLM cases, each run in a fresh subprocess, one after another (tools/llm_memory.py
    does the work): a LLaMA of ``shape`` with real random float32 weights compacted in memory by
    each tool (Torch-Pruning side by side), then the same model written as a sharded checkpoint
    and compacted by ``compact_checkpoint``, weights only and, with ``calib`` sequences,
    reconstructed block by block (Torch-Pruning has neither a checkpoint nor a reconstruction
    mode, so those rows are graphprune's alone). Time, CPU time and peak RSS per row."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llm_memory

    mem = llm_memory.memory_runs(list(tools), shape, ratio, calib=calib)
    rows = [{"case": f"llm_{shape}", **r} for r in mem]
    calibs = [0, calib] if calib else [0]
    rows += [{"case": f"ckpt_{shape}", **r}
             for r in llm_memory.checkpoint_runs(Path(workdir), shape, ratio, shard_gib, calibs)]
    return rows


def llm_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'case':<16} {'tool':<24} {'model GiB':>9} {'peak RSS GiB':>12} {'wall s':>8} {'cpu s':>8} "
            f"{'result GiB':>10} {'load':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['case']:<16} {' '.join(r['args'][:2]):<24} failed: {r['failed'][-300:]!r}")
            continue
        result = r.get("compact_gib", r.get("written_gib", float("nan")))
        lines.append(f"{r['case']:<16} {r['tool']:<24} {r['model_gib']:9.2f} {r['peak_rss_gib']:12.2f} "
                     f"{r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {result:10.2f} {r['loadavg']:5.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--profile", action="store_true", help="cProfile each stage (cold run), print hotspots")
    p.add_argument("--json", help="save the results here")
    p.add_argument("--twin", action="store_true", help="only the meta-vs-real plan check")
    p.add_argument("--torch-threads", type=int,
                   help="torch.set_num_threads in each case (default: torch's own, all cores); on a "
                        "machine busy with other work, 1 avoids intra-op threads spinning against it")
    p.add_argument("--llm", metavar="SHAPE", help="only the LLM cases for a tools/llm_memory.py shape "
                   "(tinyllama: 1.1B fp32, 4.1 GiB; small; tiny: checks the tool on a busy machine)")
    p.add_argument("--llm-tools", default=",".join(LLM_TOOLS),
                   help="in-memory tools for --llm (add graphprune-reconstruct: compact(data=...) in memory)")
    p.add_argument("--calib", type=int, default=0, metavar="N",
                   help="--llm: also reconstruct with N calibration sequences of 128 tokens")
    p.add_argument("--workdir", default="/tmp", help="--llm: where the checkpoint is written (deleted after)")
    p.add_argument("--shard-gib", type=float, default=0.5, help="--llm: checkpoint shard size")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.llm:
        rows = llm_cases(args.llm, args.ratio, args.calib, args.workdir, args.shard_gib,
                         tuple(args.llm_tools.split(",")))
        print(llm_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.one:
        res = run_case(args.one, args.ratio, args.profile)
        res["torch_threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(res))
        return 0
    if args.twin:
        print(json.dumps(twin_check(), indent=2))
        return 0
    from tqdm import tqdm

    results = []
    for case in tqdm(args.cases.split(","), desc="engine_speed", file=sys.stderr):
        cmd = [sys.executable, __file__, "--one", case, "--ratio", str(args.ratio)]
        if args.profile:
            cmd.append("--profile")
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{case}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        if args.profile:
            for stage_name, text in r["cold"].get("hotspots", {}).items():
                print(f"==== {case} / {stage_name}\n{text}")
    print(table(results))
    text = scaling(results)
    if text:
        print()
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
