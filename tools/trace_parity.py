"""Does graph/fasttrace.py give torch.export's program? Node for node, on many micro models.

Traces every model twice, with ``torch.export.export(strict=False)`` and with
``fasttrace.fast_export``, and compares everything graphprune reads (``program_facts`` of
tests/test_fasttrace.py: ops, arguments, module stacks, shapes, dtypes, stack traces, signature,
specs, state_dict and constants, wrapped regions). Prints the first difference per model, the
models the fast trace refused (and why), and the CPU seconds of both tracers.

    python tools/trace_parity.py                 # 100 fuzz architectures + every test/zoo model
    python tools/trace_parity.py --fuzz 500      # a longer run
    python tools/trace_parity.py --zoo           # tools/zoo.py's torchvision + timm models
    python tools/trace_parity.py --recorder eager   # the eager recorder only (no make_fx fallback)

Run it after a torch upgrade: the fast trace copies torch.export's settings and passes, and a new
torch may add one. tests/test_fasttrace.py keeps a small sample of these cases.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def zoo_cases() -> list[tuple[str, Callable[[], tuple[Any, Any]]]]:
    """tools/zoo.py's models (every torchvision classifier, one timm model per family)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import zoo_models
    from compare import import_torchvision

    import_torchvision()  # the op-schema stubs, before anything imports torchvision
    names = zoo_models.torchvision_names() + zoo_models.timm_names()
    return [(f"zm:{n}", lambda n=n: zoo_models.build(n)) for n in names]


def cases(fuzz: int) -> list[tuple[str, Callable[[], tuple[Any, Any]]]]:
    import fuzzgen
    import rewrite_models
    import torch
    import transformer_models

    from graphprune import zoo

    out: list[tuple[str, Callable[[], tuple[Any, Any]]]] = [
        (f"fuzz{s}", lambda s=s: fuzzgen.build(fuzzgen.random_spec(s))) for s in range(fuzz)]
    out += [(f"tm:{n}", lambda n=n: transformer_models.build(n)) for n in transformer_models.BUILDERS]
    try:
        import hf_models
        import transformers  # noqa: F401

        out += [(f"hf:{n}", lambda n=n: hf_models.build(n)) for n in hf_models.BUILDERS]
    except ImportError:
        pass
    out += [("rw:TinyViT", lambda: (rewrite_models.TinyViT(), torch.randn(2, 8, 12))),
            ("rw:TinyCsp", lambda: (rewrite_models.TinyCsp(), torch.randn(2, 3, 8, 8)))]
    out += [(f"zoo:{n}", lambda n=n: zoo.build(n)) for n in zoo.names()]
    return out


def first_difference(a: tuple, b: tuple) -> str:
    parts = ("nodes", "input specs", "output specs", "in_spec", "out_spec", "state_dict", "constants",
             "wrapped regions")
    for name, x, y in zip(parts, a, b, strict=True):
        if x == y:
            continue
        if isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y, strict=False)):
                if u != v:
                    return f"{name}[{i}]:\n  export {u}\n  fast   {v}"
            return f"{name}: {len(x)} vs {len(y)} entries"
        return f"{name}:\n  export {x}\n  fast   {y}"
    return ""


def bypass_layout_noops(ep: Any) -> None:
    """Remove ``contiguous()`` calls from ``ep``'s graph (in place), each use reading its input.

    ``t.contiguous()`` reaches the dispatcher only when ``t`` is not contiguous already, and the
    eager recorder sees the strides real kernels produce, which differ from the fake kernels' in
    dimensions of size 1 (``view``): the same forward then records one more or one fewer of
    these value-preserving calls. Differences that remain after this are real.
    """
    import torch

    for n in list(ep.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.contiguous.default:
            n.replace_all_uses_with(n.args[0])
            ep.graph.erase_node(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz", type=int, default=100, help="random fuzz architectures")
    parser.add_argument("--recorder", default="auto", choices=("auto", "eager", "make_fx"),
                        help="the fast trace's recorder (fasttrace.fast_export's recorder=)")
    parser.add_argument("--zoo", action="store_true",
                        help="tools/zoo.py's torchvision and timm models instead (they must import)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch
    from test_fasttrace import program_facts
    from tqdm import tqdm

    from graphprune.graph import fasttrace
    from graphprune.graph.copies import eval_copy
    from graphprune.graph.inputs import normalize_inputs
    from graphprune.graph.trace import no_cache

    torch.set_num_threads(1)
    counts = {"same": 0, "same but contiguous()": 0, "different": 0, "refused": 0, "export failed": 0}
    cpu = {"export": 0.0, "fast": 0.0}
    todo = zoo_cases() if args.zoo else cases(args.fuzz)
    for i, (label, make) in enumerate(tqdm(todo, desc="trace parity", file=sys.stderr)):
        model, x = make()
        model = eval_copy(model)
        a, k = normalize_inputs(x)
        # alternate which tracer goes first: the first warms torch's fake-tensor caches for both
        order = ("export", "fast") if i % 2 == 0 else ("fast", "export")
        got: dict[str, Any] = {}
        took: dict[str, float] = {}
        for which in order:
            # each tracer on its own copy: a forward that fills a cache on its first call (timm's
            # attention-bias caches) would otherwise show the second tracer a different model
            own = copy.deepcopy(model)
            with no_cache(own):
                t = time.process_time()
                try:
                    got[which] = (torch.export.export(own, a, k, strict=False) if which == "export"
                                  else fasttrace.fast_export(own, a, k, recorder=args.recorder))
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    got[which] = exc
                took[which] = time.process_time() - t
        ref, fast = got["export"], got["fast"]
        if isinstance(ref, Exception):
            counts["export failed"] += 1
            print(f"{label}: torch.export failed: {type(ref).__name__}: {str(ref)[:120]}")
            continue
        if isinstance(fast, Exception):
            counts["refused"] += 1
            print(f"{label}: refused: {type(fast).__name__}: {str(fast)[:160]}")
            continue
        t_export, t_fast = took["export"], took["fast"]
        cpu["export"] += t_export
        cpu["fast"] += t_fast
        diff = first_difference(program_facts(ref), program_facts(fast))
        if diff:
            bypass_layout_noops(ref)
            bypass_layout_noops(fast)
            if not first_difference(program_facts(ref), program_facts(fast)):
                counts["same but contiguous()"] += 1
                print(f"{label}: same up to contiguous() calls (strides of size-1 dimensions)")
                continue
        counts["different" if diff else "same"] += 1
        if diff:
            print(f"{label}: DIFFERENT {diff[:1500]}")
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"CPU seconds over the models both traced: torch.export {cpu['export']:.1f}, fast "
          f"{cpu['fast']:.1f} (ratio {cpu['export'] / max(cpu['fast'], 1e-9):.2f})")


if __name__ == "__main__":
    main()
