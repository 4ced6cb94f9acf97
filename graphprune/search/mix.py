"""Width and depth together: try several block counts, cut widths to the target, keep the best.

``compact(model, x, depth="search", target_...=...)`` lands here. For each candidate number of
removed blocks (0, and 1/8, 1/4, 3/8, 1/2 of the removable ones by default) the blocks go first
and the width search (graphprune.search.targets) then meets the whole model's target:

* ``target_flops`` / ``target_params``: a fraction of the *original* model, so the width search
  on the shallower model is asked for ``target * original / shallow``;
* ``target_speedup``: the shallower model's own measured speed-up ``s`` is taken out of it
  (``target / s``); when depth alone already meets it, no width is cut;
* ``target_latency_ms`` is absolute and is passed on unchanged.

Every finished candidate is timed against the original in onnxruntime (interleaved runs, same
process). The winner: for a FLOPs or parameter budget, the fastest; for a speed target, the
candidate that meets it with the most parameters kept (the fastest if none meets it). The
returned plan's notes and :class:`MixResult` report every mix tried and which one won.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphprune.errors import InputError
from graphprune.planning.plan import Plan

DEPTHS = (0.0, 0.125, 0.25, 0.375, 0.5)


@dataclass
class MixRow:
    blocks: int  # blocks removed
    ratio: float  # width ratio the search chose on the shallower model
    params: float  # fraction of the original kept
    flops: float
    speedup: float  # measured against the original
    met: bool
    chosen: bool = False
    note: str = ""


@dataclass
class MixResult:
    model: nn.Module
    plan: Plan
    target: str
    rows: list[MixRow] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"width x depth search, {self.target}:",
                 "   blocks   ratio  params   FLOPs  speed-up  met"]
        for r in self.rows:
            lines.append(f"{'*' if r.chosen else ' '} {r.blocks:>6} {r.ratio:>7.3f} {r.params:>7.1%} "
                         f"{r.flops:>7.1%} {r.speedup:>8.2f}x  {'yes' if r.met else 'no'} {r.note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def search_mix(model: nn.Module, example_input: Any, targets: dict[str, float | None], *,
               depths: Sequence[float] = DEPTHS, runs: int = 20, **options: Any) -> MixResult:
    """See the module docstring. ``options`` are compact's other keywords, passed on."""
    import graphprune

    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise InputError("depth='search' needs exactly one target_... (flops, params, speedup or latency_ms)")
    (kind, value), = given.items()
    if options.get("ratio") is not None:
        raise InputError("depth='search' chooses the width ratio itself; drop ratio=")
    options.pop("ratio", None)
    n_blocks = sum(b.removable for b in graphprune.find_blocks(
        model, example_input, options.get("ignored_layers", ()), options.get("depth_unit", "module")))
    counts = sorted({int(round(d * n_blocks)) for d in depths})
    base_params = graphprune.count_params(model)
    base_flops = graphprune.count_flops(model, example_input)
    rows: list[MixRow] = []
    built: list[tuple[nn.Module, Plan]] = []
    for n in counts:
        # compact_with_plan turns the whole-model target into what is left after the n blocks
        small, plan = graphprune.compact_with_plan(model, example_input, depth=n, **{kind: value},
                                                   **_width_opts(options))
        rep = graphprune.benchmark(model, small, example_input, runs=runs, warmup=3)
        row = MixRow(n, plan.ratio, rep.compact_params / base_params, rep.compact_flops / base_flops,
                     rep.speedup, _met(kind, value, rep, base_params))
        rows.append(row)
        built.append((small, plan))
    win = _winner(kind, rows)
    rows[win].chosen = True
    small, plan = built[win]
    label = f"{kind.removeprefix('target_')} {value:g}"
    result = MixResult(small, plan, label, rows)
    plan.notes.append(f"width x depth: {rows[win].blocks} blocks + width ratio {rows[win].ratio:.3f} won "
                      f"({len(rows)} mixes tried, {label})")
    return result


def _width_opts(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not k.startswith("target_")}


def remaining_target(kind: str, value: float, model: nn.Module, shallow: nn.Module, x: Any,
                     runs: int = 20) -> tuple[float, bool]:
    """What the width search must still achieve on the shallower model; True if nothing is left.

    FLOPs and parameter budgets are fractions of ``model``; a speed-up has the shallower
    model's own measured speed-up taken out; an absolute latency is unchanged.
    """
    import graphprune

    if kind == "target_flops":
        frac = graphprune.count_flops(shallow, x) / graphprune.count_flops(model, x)
    elif kind == "target_params":
        frac = graphprune.count_params(shallow) / graphprune.count_params(model)
    elif kind == "target_speedup":
        s = graphprune.benchmark(model, shallow, x, runs=runs, warmup=3).speedup
        return value / s, s >= value
    else:
        return value, False  # absolute latency: the width search measures it on the shallow model
    return min(value / frac, 0.999), frac <= value


def _met(kind: str, value: float, rep: Any, base_params: int) -> bool:
    if kind == "target_flops":
        return rep.compact_flops / rep.original_flops <= value * 1.02
    if kind == "target_params":
        return rep.compact_params / base_params <= value * 1.02
    if kind == "target_speedup":
        return rep.speedup >= value * 0.98
    return rep.compact_latency.median_ms <= value * 1.02


def _winner(kind: str, rows: list[MixRow]) -> int:
    met = [i for i, r in enumerate(rows) if r.met]
    if kind in ("target_flops", "target_params") or not met:
        pool = met or list(range(len(rows)))
        return max(pool, key=lambda i: rows[i].speedup)
    return max(met, key=lambda i: rows[i].params)
