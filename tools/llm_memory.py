"""Memory and time of compacting an LLM: graphprune vs Torch-Pruning, and a streamed checkpoint.

Every run is its own subprocess, so its peak RSS (``ru_maxrss``) is its own; runs go one after
another, never two at once. Real float32 weights (random values: memory and time do not depend
on them). The model is a LLaMA built from a config, no download.

    python tools/llm_memory.py                        # TinyLlama-1.1B shape (4.1 GiB fp32)
    python tools/llm_memory.py --shape small          # ~0.4 GiB, for development
    python tools/llm_memory.py --tools graphprune --profile   # where graphprune's time goes
    python tools/llm_memory.py --tools graphprune --where     # where graphprune's memory peaks
    python tools/llm_memory.py --checkpoint DIR       # write a sharded checkpoint, compact it
                                                      # with compact_checkpoint, report peak RSS
    python tools/llm_memory.py --checkpoint DIR --calib 8   # the same with 8 calibration
                                                      # sequences: reconstruction block by block

Targets (issue 12): peak RSS <= 1.3x the model's size + 0.8 GiB, and no slower than
Torch-Pruning on the same model. Without ``inplace`` graphprune keeps the user's model and
builds the compact one beside it (peak about model + compact model); ``inplace=True`` shrinks
the model itself. Torch-Pruning always prunes in place.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # TinyLlama-1.1B: hidden 2048, 22 blocks, 32 heads in 4 KV groups, SwiGLU 5632, vocab 32000
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    # checks that the tools run on a busy machine (~40 MiB); numbers from it mean nothing
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512),
}
TOOLS = ("graphprune", "graphprune-inplace", "torch-pruning")
CALIB_TOKENS = 128  # tokens per calibration sequence (--calib N sequences, 2 per batch)


def calibration(vocab: int, sequences: int) -> list[torch.Tensor]:
    """``sequences`` random token-id sequences in batches of 2 (random weights: content is moot)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sequences, CALIB_TOKENS), generator=gen)
    return list(ids.split(2))


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    """User + system CPU seconds of this process: on a shared machine a fairer clock than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _PeakWhere:
    """Samples this process's RSS every few ms; at each new peak, remembers where the main thread
    was (its innermost graphprune frames): which step of ``compact`` sets the peak."""

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self.every_s = every_s
        self.main = threading.main_thread().ident
        self.peaks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_gib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _where(self) -> str:
        import traceback

        frame = sys._current_frames().get(self.main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        ours = [f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in stack if "graphprune" in f.filename]
        return " > ".join(ours[-4:]) or "(outside graphprune)"

    def _run(self) -> None:
        best = 0.0
        while not self._stop.wait(self.every_s):
            rss = self._rss_gib()
            if rss > best + 0.02:
                best = rss
                self.peaks.append((rss, self._where()))

    def __enter__(self) -> _PeakWhere:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, last: int = 12) -> str:
        """The last ``last`` steps that raised the peak (consecutive samples at one place merged)."""
        steps: list[tuple[float, float, str]] = []
        for gib, where in self.peaks:
            if steps and steps[-1][2] == where:
                steps[-1] = (steps[-1][0], gib, where)
            else:
                steps.append((gib, gib, where))
        return "\n".join(f"  {a:6.2f} -> {b:6.2f} GiB  {where}" for a, b, where in steps[-last:])


def _config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def run_one(tool: str, shape: str, ratio: float, profile: bool, where: bool = False,
            calib_sequences: int = 0) -> dict[str, Any]:
    """Build the model, compact it with ``tool``; seconds and peak RSS of this process."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(shape)).eval()
    model.config.use_cache = False  # as Torch-Pruning's LLM example does (its tracer cannot walk a cache)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    after_build = _peak_gib()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    x = {"input_ids": ids}
    prof = cProfile.Profile() if profile else None
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    tracer = _PeakWhere() if where and tool.startswith("graphprune") else None
    if tool == "graphprune-reconstruct":  # in memory, for comparison with the checkpoint's calibration
        import graphprune

        calib = calibration(model.config.vocab_size, calib_sequences or 8)
        small = graphprune.compact(model, calib[0][:1], ratio, data=calib)
        x = {"input_ids": calib[0][:1]}
    elif tool.startswith("graphprune"):
        import graphprune

        if tracer:
            with tracer:
                small = graphprune.compact(model, x, ratio, inplace=tool.endswith("inplace"))
        else:
            small = graphprune.compact(model, x, ratio, inplace=tool.endswith("inplace"))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from tp_baseline import prune_with_tp

        small = prune_with_tp(model, x, ratio)
    if prof:
        prof.disable()
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    with torch.no_grad():
        runs = tuple(small(**x).logits.shape) == (1, x["input_ids"].shape[1], model.config.vocab_size)
    out = {
        "tool": tool, "shape": shape, "model_gib": size, "rss_after_build_gib": after_build,
        "peak_rss_gib": _peak_gib(), "seconds": seconds, "cpu_seconds": cpu, "runs": runs,
        "compact_gib": sum(p.numel() * p.element_size() for p in small.parameters()) / 2**30,
        "loadavg": os.getloadavg()[0],
    }
    if tracer:
        out["peaks"] = tracer.report()
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats("graphprune", 30)
        out["profile"] = buf.getvalue()
    return out


def write_checkpoint(folder: Path, shape: str, shard_gib: float) -> None:
    """A sharded safetensors checkpoint of random float32 weights, written tensor by tensor from
    the meta model's shapes: the writer never holds more than one shard."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True)
    config = _config(shape)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    names = list(meta.state_dict().items())
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    plan = []
    for name, t in names:
        nbytes = t.numel() * 4
        if sizes[-1] and sizes[-1] + nbytes > shard_gib * 2**30:
            shards.append({})
            sizes.append(0)
        plan.append((len(shards) - 1, name, tuple(t.shape)))
        sizes[-1] += nbytes
    n = len(shards)
    weight_map = {}
    for k in range(n):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {name: torch.randn(shp, generator=gen) * 0.02 for s, name, shp in plan if s == k}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def run_checkpoint(src: Path, ratio: float, calib_sequences: int = 0,
                   calib_importance: str = "reconstruct") -> dict[str, Any]:
    """``compact_checkpoint`` of ``src``; with ``calib_sequences``, calibration block by block:
    reconstruction (greedy OBS selection and refit), or a data-driven criterion measured block by
    block ("activation", "apoz") with the weights sliced as they are."""
    import graphprune

    dst = src.with_name(src.name + "-compact")
    shutil.rmtree(dst, ignore_errors=True)
    shards = sorted(src.glob("*.safetensors"))
    kwargs: dict[str, Any] = {}
    if calib_sequences:
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        kwargs["data"] = calibration(vocab, calib_sequences)
        if calib_importance != "reconstruct":
            kwargs["importance"] = calib_importance
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    result = graphprune.compact_checkpoint(src, dst, ratio, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    shutil.rmtree(dst, ignore_errors=True)
    what = "calib" if calib_importance == "reconstruct" else calib_importance
    return {
        "tool": "checkpoint" + (f" {what} {calib_sequences}x{CALIB_TOKENS}" if calib_sequences else ""),
        "shards": len(shards), "resident_weights_gib": result.peak_resident_bytes / 2**30,
        "largest_shard_gib": max(p.stat().st_size for p in shards) / 2**30,
        "model_gib": result.bytes_in / 2**30, "written_gib": result.bytes_out / 2**30,
        "peak_rss_gib": _peak_gib(), "seconds": seconds, "cpu_seconds": cpu,
        "config_updated": result.config_updated,
        "read_write_gib_per_s": (2 * result.bytes_in + result.bytes_out) / 2**30 / seconds,
        "loadavg": os.getloadavg()[0],
    }


def _child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's graphprune, not an installed one
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"failed": proc.stderr[-2000:], "args": args}
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="tinyllama")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--profile", action="store_true", help="cProfile graphprune's call (cumulative)")
    p.add_argument("--where", action="store_true",
                   help="sample RSS during graphprune's call and print where each new peak was reached")
    p.add_argument("--checkpoint", metavar="DIR", help="write a sharded checkpoint here (deleted after)")
    p.add_argument("--shard-gib", type=float, default=0.5)
    p.add_argument("--calib", type=int, default=0, metavar="N",
                   help=f"N calibration sequences of {CALIB_TOKENS} tokens: reconstruct (checkpoint, and the "
                        "graphprune-reconstruct tool)")
    p.add_argument("--calib-importance", default="reconstruct", choices=("reconstruct", "activation", "apoz"),
                   help="--checkpoint with --calib: what the calibration data decides (default reconstruct)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.shape, args.ratio, args.profile, args.where,
                                             args.calib)))
        return 0
    if args.one_checkpoint:
        print("RESULT " + json.dumps(run_checkpoint(Path(args.one_checkpoint), args.ratio, args.calib,
                                                    args.calib_importance)))
        return 0
    if args.checkpoint:
        for r in checkpoint_runs(Path(args.checkpoint), args.shape, args.ratio, args.shard_gib,
                                 [args.calib] if args.calib else [0], args.calib_importance):
            print(json.dumps(r, indent=1))
        return 0
    rows = memory_runs(args.tools.split(","), args.shape, args.ratio, args.profile, args.calib, args.where)
    print(table(rows))
    return 0


def memory_runs(tools: list[str], shape: str, ratio: float, profile: bool = False,
                calib: int = 0, where: bool = False) -> list[dict[str, Any]]:
    """Each tool on the in-memory model, one fresh subprocess after another."""
    rows = []
    for tool in tools:
        extra = (["--profile"] if profile else []) + (["--where"] if where else [])
        r = _child(["--one", tool, "--shape", shape, "--ratio", str(ratio), "--calib", str(calib), *extra])
        if "profile" in r:
            print(r.pop("profile"))
        if "peaks" in r:
            print(f"{tool}: RSS peaks during compact (GiB, where)\n{r.pop('peaks')}")
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    return rows


def checkpoint_runs(folder: Path, shape: str, ratio: float, shard_gib: float,
                    calibs: list[int], calib_importance: str = "reconstruct") -> list[dict[str, Any]]:
    """Write the sharded checkpoint once, compact it once per entry of ``calibs`` (0: weights only)."""
    src = folder / f"{shape}-fp32"
    shutil.rmtree(src, ignore_errors=True)
    write_checkpoint(src, shape, shard_gib)
    try:
        return [_child(["--one-checkpoint", str(src), "--ratio", str(ratio), "--calib", str(c),
                        "--calib-importance", calib_importance]) for c in calibs]
    finally:
        shutil.rmtree(src, ignore_errors=True)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'tool':<22} {'model GiB':>9} {'peak GiB':>9} {'target':>7} {'seconds':>8} {'cpu s':>8} "
             f"{'compact GiB':>11} {'runs':>5} {'load':>5}"]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['args'][1]:<22} failed: {r['failed'][-300:]}")
            continue
        target = 1.3 * r["model_gib"] + 0.8
        lines.append(f"{r['tool']:<22} {r['model_gib']:9.2f} {r['peak_rss_gib']:9.2f} {target:7.2f} "
                     f"{r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {r['compact_gib']:11.2f} "
                     f"{str(r['runs']):>5} {r['loadavg']:5.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
