"""Fuzz graphprune with random architectures: ``python tools/fuzz.py --cases 500``.

Each case draws an architecture from tests/fuzzgen.py (seeded: case k of ``--seed S`` is always
the same model), a ratio and ``prune_hidden``, then applies every oracle (compact with
verification, input untouched, shapes, ratio-0 identity, dead channels, onnxruntime). Failures
are grouped by signature; ``--shrink`` reduces one example per signature to a minimal spec that
can be pasted into tests/test_fuzz.py as a regression test.

Results go to ``--out`` (JSON lines, one per case) so a long run can be inspected while it runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def case_params(seed: int) -> tuple[float, bool]:
    """Ratio and prune_hidden of case ``seed`` (independent of the architecture draw)."""
    rng = random.Random(seed * 7919 + 1)
    return rng.choice(RATIOS), rng.random() < 0.3


ATTENTION = ("heads", "q_heads", "head_dim")


def case_attention(seed: int, choice: str) -> str:
    """The ``attention=`` mode of case ``seed``: fixed, or drawn per case with ``mixed``."""
    return random.Random(seed * 104729 + 3).choice(ATTENTION) if choice == "mixed" else choice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100, help="number of cases (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="first case seed (default 0)")
    parser.add_argument("--max-ops", type=int, default=6, help="ops per architecture (default 6)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime oracle (faster)")
    parser.add_argument("--shrink", action="store_true", help="shrink one failing case per signature")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines results file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--attention", choices=ATTENTION + ("mixed",), default="heads",
                        help="attention= mode of every case, or 'mixed' to draw one per case")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import fuzzgen

    out = args.out.open("a") if args.out else None
    signatures: Counter[str] = Counter()
    examples: dict[str, tuple[dict, float, bool, int, str]] = {}
    failed = pruned = 0
    start = time.time()
    for k in range(args.cases):
        seed = args.seed + k
        spec = fuzzgen.random_spec(seed, args.max_ops)
        ratio, prune_hidden = case_params(seed)
        attention = case_attention(seed, args.attention)
        t0 = time.time()
        res = fuzzgen.run_case(spec, ratio, prune_hidden, onnx=not args.no_onnx, attention=attention)
        pruned += res.pruned
        sigs = sorted({f.signature for f in res.failures})
        if sigs:
            failed += 1
            for s in sigs:
                signatures[s] += 1
                examples.setdefault(s, (spec, ratio, prune_hidden, seed, attention))
        status = "FAIL " + " | ".join(sigs) if sigs else "ok"
        print(
            f"case {seed}: ratio={ratio} prune_hidden={prune_hidden} attention={attention} "
            f"{time.time() - t0:.1f}s {status}",
            flush=True,
        )
        if out:
            record = {
                "seed": seed,
                "ratio": ratio,
                "prune_hidden": prune_hidden,
                "attention": attention,
                "pruned": res.pruned,
                "spec": spec,
                "failures": [
                    {"oracle": f.oracle, "error": f.error, "detail": f.detail} for f in res.failures
                ],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
    elapsed = time.time() - start
    print(
        f"\n{args.cases} cases in {elapsed:.0f}s: {args.cases - failed} passed every oracle, "
        f"{failed} failed; {pruned} cases removed something"
    )
    for sig, n in signatures.most_common():
        spec, ratio, prune_hidden, seed, attention = examples[sig]
        print(f"\n[{n}x] {sig}\n  first: case {seed} ratio={ratio} prune_hidden={prune_hidden} "
              f"attention={attention}")
        if args.shrink:
            spec = fuzzgen.shrink(spec, ratio, prune_hidden, sig, attention=attention)
            print("  shrunk:")
        print("  " + fuzzgen.spec_json(spec))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
