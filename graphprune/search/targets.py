"""Compaction to a target: a FLOPs or parameter budget, or a measured speed-up / latency.

Why this module exists: people think "half the FLOPs" or "twice as fast on this machine", not
"remove 29 % of every group". A uniform ratio maps to FLOPs only roughly (a conv loses
``1 - (1 - r)^2`` of its FLOPs when both its input and output shrink) and to latency not at all
reliably, so the ratio is *searched*:

* The model is analysed once (tracing and grouping are the expensive part); every candidate is a
  new plan on the same :class:`~graphprune.graph.analysis.Analysis` and a surgery on a copy.
* Candidates lie on a **ladder**: removal steps of single groups ordered by the uniform ratio at
  which each step happens, so step ``t`` is "the uniform ratio, refined per group". Bisection on
  the ladder (with interpolation steps) hits a FLOPs or parameter target to within one group step,
  which is what makes a 2 % tolerance reachable even where many same-sized groups jump together.
* ``round_to=N`` makes the ladder use only widths that are multiples of ``N`` (whole heads stay
  whole: a unit of ``u`` positions counts ``u`` channels); ``round_to="auto"`` (the default, as
  in ``compact``) uses each group's own alignment (``graphprune.planning.cut.alignment``);
  ``round_to="measured"`` tries "auto", 1, 8, 16 and 32 and keeps the one whose compact model
  runs fastest in onnxruntime.
* Speed targets export each candidate to ONNX and time it in onnxruntime interleaved with the
  original (warm-up, repeated runs, median), so load drift hits both alike; the search keeps the
  least-pruned candidate that meets the target.

Every candidate tried is kept in :attr:`TargetResult.candidates` and printed by ``str(result)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from graphprune.errors import InputError, warn_user
from graphprune.export.bench import count_flops, count_params
from graphprune.graph.copies import keeps_global_rng
from graphprune.graph.fasttrace import retried_with_export
from graphprune.planning.importance import Criterion
from graphprune.planning.options import AUTO
from graphprune.search.results import Candidate, RoundTo, TargetResult, round_order
from graphprune.search.searcher import Search, choose_round_to_at, progress_bar, speed_search, static_search
from graphprune.surgery.fallback import check_fallback

__all__ = [
    "ROUND_CHOICES",
    "Candidate",
    "TargetResult",
    "best_round_to",
    "check_targets",
    "compact_to_target",
    "sweep",
    "targeted",
]

ROUND_CHOICES: tuple[RoundTo, ...] = (AUTO, 1, 8, 16, 32)
_KINDS = ("flops", "params", "speedup", "latency_ms")


# --------------------------------------------------------------------------------------------------
# The API: validation, compact_to_target, best_round_to, sweep


def check_targets(ratio: Any = None, **targets: Any) -> dict[str, float]:
    """Validate target keyword arguments: at most one target, never together with a ratio.

    ``targets`` holds ``target_flops`` / ``target_params`` (fraction of the original kept, in
    (0, 1]), ``target_speedup`` (>= 1) and ``target_latency_ms`` (> 0); ``None`` values are unset.
    Returns ``{kind: value}`` with at most one entry.
    """
    given = {k.removeprefix("target_"): v for k, v in targets.items() if v is not None}
    unknown = [k for k in given if k not in _KINDS]
    if unknown:
        raise InputError(f"unknown target {unknown}; use one of {['target_' + k for k in _KINDS]}")
    if len(given) > 1:
        raise InputError(
            f"pass one target at a time, got {sorted('target_' + k for k in given)}: the search "
            "optimises a single quantity."
        )
    if given and ratio is not None:
        raise InputError(
            f"pass either ratio or target_{next(iter(given))}, not both: the target search chooses the "
            "ratio itself (the chosen ratio is in the returned plan)."
        )
    for kind, v in given.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"target_{kind} must be a number, got {v!r}")
        if kind in ("flops", "params") and not 0 < v <= 1:
            raise InputError(
                f"target_{kind} is the fraction of the original kept, in (0, 1]; got {v!r} "
                f"(e.g. target_{kind}=0.5 keeps half)."
            )
        if kind == "speedup" and v < 1:
            raise InputError(f"target_speedup must be >= 1 (2.0 = twice as fast), got {v!r}")
        if kind == "latency_ms" and v <= 0:
            raise InputError(f"target_latency_ms must be positive, got {v!r}")
    return {k: float(v) for k, v in given.items()}


def _describe(kind: str, value: float) -> str:
    return {
        "flops": f"FLOPs <= {value:.1%} of the original",
        "params": f"params <= {value:.1%} of the original",
        "speedup": f"measured speed-up >= {value:.2f}x",
        "latency_ms": f"measured latency <= {value:.3f} ms",
    }[kind]


def _within(c: Candidate, kind: str, value: float, tolerance: float) -> bool:
    """Whether a FLOPs/params candidate meets ``value`` within the relative ``tolerance``."""
    got = c.flops_frac if kind == "flops" else c.params_frac
    return abs(got / value - 1) <= tolerance


def _round_choices(round_to: RoundTo | None) -> tuple[RoundTo, ...]:
    if round_to == "measured":
        return ROUND_CHOICES
    if round_to is None:
        return (1,)
    if round_to == AUTO:
        return (AUTO,)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to must be 'auto', a positive int or 'measured', got {round_to!r}")
    return (int(round_to),)


@retried_with_export
@keeps_global_rng
def compact_to_target(
    model: nn.Module,
    example_input: Any,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    importance: str | Criterion = "l2",
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    data: Any = None,
    loss_fn: Any = None,
    round_to: RoundTo = AUTO,
    tolerance: float = 0.02,
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    max_candidates: int = 8,
    verify: bool = True,
    progress: bool = False,
    fallback: str = "freeze",
    reconstruct: Any = False,
) -> TargetResult:
    """Find the compaction that meets one target; return it with every candidate tried.

    * ``target_flops`` / ``target_params``: fraction of the original kept (0.5 = half). Met when
      the compact model's fraction is within ``tolerance`` (relative, 2 % by default) of it.
    * ``target_speedup`` (onnxruntime median, original / compact) or ``target_latency_ms``: each
      candidate is exported to ONNX and timed interleaved with the original (``warmup`` + ``runs``
      runs, ``threads`` intra-op threads); the least-pruned candidate that meets the target wins.
    * ``round_to``: kept widths are multiples of it; ``"auto"`` (default) aligns each group as
      ``compact`` does, 1 cuts exactly; ``"measured"`` tries "auto", 1, 8, 16, 32 and keeps
      the fastest in onnxruntime (for FLOPs/params targets: each at the target; for speed
      targets: the best at the first probe, then searched with that one).

    ``importance`` (with ``data`` / ``loss_fn`` for data-driven criteria) scores units as in
    :func:`graphprune.compact`. The model is analysed once; ``model`` is never modified. A
    target that cannot be met within tolerance (a model too small to reach it, one group step
    too coarse) gives the closest candidate, ``met=False`` and a warning. ``reconstruct`` (with
    ``data``) is applied to the chosen candidate only: the search sets how many units each group
    loses, reconstruction which ones and the refit (graphprune.reconstruct).
    """
    from graphprune.reconstruct import hook as recon

    goal = check_targets(
        target_flops=target_flops,
        target_params=target_params,
        target_speedup=target_speedup,
        target_latency_ms=target_latency_ms,
    )
    if not goal:
        raise InputError("compact_to_target needs one of target_flops, target_params, target_speedup, "
                         "target_latency_ms")
    (kind, value), = goal.items()
    if not 0 < tolerance < 1:
        raise InputError(f"tolerance is relative, in (0, 1); got {tolerance!r}")
    choices = _round_choices(round_to)
    rec = recon.check_request(reconstruct, data, example_input)
    source, added = recon.prepare_model(model) if rec else (model, [])
    s = Search(source, example_input, importance=importance, ignored_layers=ignored_layers,
                prune_hidden=prune_hidden, attention=attention, data=data, loss_fn=loss_fn, runs=runs,
                warmup=warmup,
                threads=threads, fallback=check_fallback(fallback))
    tried: list[Candidate] = []
    note = ""
    try:
        with progress_bar(None, f"graphprune target {kind}", progress) as bar:
            if kind in ("flops", "params"):
                finals = [static_search(s, kind, value, n, tolerance, bar) for n in choices]
                tried = [c for c in s._static.values()]
                if len(choices) > 1:  # measured widths: time each finalist, keep the fastest
                    timed = [s.measure(c, plan=s.plan_of(c)) for c in finals]
                    bar.update(len(timed))
                    frac = (lambda c: c.flops_frac) if kind == "flops" else (lambda c: c.params_frac)
                    ok = [c for c in timed if abs(frac(c) / value - 1) <= tolerance] or timed
                    best = min(ok, key=lambda c: c.latency_ms or math.inf)
                    done = {(c.round_to, c.step) for c in timed}
                    tried = [c for c in tried if (c.round_to, c.step) not in done] + timed
                    note = "round_to chosen by measured latency among " + ", ".join(
                        f"{c.round_to}: {c.latency_ms:.3f} ms" for c in timed
                    )
                else:
                    best = finals[0]
                    if best.round_to == AUTO and not _within(best, kind, value, tolerance):
                        # aligned steps too coarse for this budget (a small model): exact widths
                        exact = static_search(s, kind, value, 1, tolerance, bar)
                        tried = [c for c in s._static.values()]
                        if _within(exact, kind, value, tolerance):
                            best = exact
                            note = ("aligned widths (round_to='auto') could not meet the target within "
                                    f"{tolerance:.0%}; exact widths (round_to=1) used")
            else:
                n = choices[0]
                if len(choices) > 1:
                    n, probes = choose_round_to_at(s, kind, value, choices, bar)
                    tried.extend(probes)
                    note = "round_to chosen by measured latency at the first probe: " + ", ".join(
                        f"{c.round_to}: {c.latency_ms:.3f} ms" for c in probes
                    )
                best = speed_search(s, kind, value, n, tolerance, max_candidates, bar, tried)
        for c in tried:
            c.chosen = c is best
        if not any(c.chosen for c in tried):
            best.chosen = True
            tried.append(best)
        tried.sort(key=lambda c: (round_order(c.round_to), c.ratio))
        plan = s.plan_of(best)
        if rec:
            plan = recon.reconstructed_plan(s.analysis, plan, data, rec, None, progress=progress)
        small, plan = s.realize(plan, quiet=False)
    finally:
        s.close()
    if kind in ("flops", "params"):
        got = best.flops_frac if kind == "flops" else best.params_frac
        met = abs(got / value - 1) <= tolerance
        why = f"{kind} fraction {got:.2%} vs {value:.2%}"
    else:
        met = (best.speedup or 0) >= value if kind == "speedup" else (best.latency_ms or math.inf) <= value
        why = f"best measured: {best.latency_ms:.3f} ms, speed-up {best.speedup:.2f}x"
    plan.notes.append(f"target {_describe(kind, value)}: {'met' if met else 'not met'} ({why}); "
                      f"{len(tried)} candidates tried")
    if not met:
        warn_user(f"graphprune: target {_describe(kind, value)} not met; closest candidate kept ({why})")
    if verify:
        from graphprune.verify import verify_compact

        verify_compact(s.analysis, plan, small, example_input, original=s.analysis.model if rec else model)
    if rec:
        recon.finish(small, plan, added)
    return TargetResult(small, plan, _describe(kind, value), met, s.params, s.flops, tried, note, kind, value)


def targeted(
    model: nn.Module,
    example_input: Any,
    ratio: Any,
    targets: dict[str, Any],
    *,
    global_pruning: bool = False,
    max_ratio: float | None = None,
    ratios: Any = None,
    round_to: int | str | None = None,
    **options: Any,
) -> TargetResult:
    """``graphprune.compact(..., target_*=...)``: check the combination, then search.

    The search moves every group along one ladder, so it cannot honour per-module ``ratios`` or
    global ranking; those combinations are refused instead of silently ignored. ``options`` are
    compact's other keywords (importance, data, attention, verify...), passed on unchanged to
    :func:`compact_to_target`, whose signature is their one description.
    """
    check_targets(ratio, **targets)
    if global_pruning or ratios or max_ratio is not None:
        raise InputError(
            "a target_... search sets every group's ratio itself; it cannot be combined with "
            "global_pruning, max_ratio or ratios. Drop those, or use a ratio instead of the target."
        )
    return compact_to_target(
        model, example_input, **targets, round_to=1 if round_to is None else round_to, **options
    )


def best_round_to(
    model: nn.Module,
    example_input: Any,
    ratio: float = 0.5,
    *,
    choices: Sequence[RoundTo] = ROUND_CHOICES,
    importance: str | Criterion = "l2",
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[RoundTo, list[Candidate]]:
    """Which ``round_to`` makes the model compacted at ``ratio`` run fastest in onnxruntime.

    Each choice rounds every group to its nearest allowed width at ``ratio`` (so FLOPs stay
    comparable); all candidates are timed interleaved with the original. Returns the winner and
    the measured candidates (compare ``latency_ms`` and ``efficiency``).
    """
    s = Search(model, example_input, importance=importance, ignored_layers=ignored_layers,
                prune_hidden=prune_hidden, attention=attention, runs=runs, warmup=warmup,
                threads=threads)
    try:
        out = []
        for n in tqdm(list(choices), desc="graphprune round_to", disable=not progress):
            plan = s.plan(ratio, round_to=n)
            out.append(s.measure(s.evaluate(plan, ("r", n, ratio), round_to=n), plan=plan))
    finally:
        s.close()
    best = min(out, key=lambda c: c.latency_ms or math.inf)
    best.chosen = True
    return best.round_to, out


@keeps_global_rng
def sweep(
    model: nn.Module,
    example_input: Any,
    ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    *,
    importance: str | Criterion = "l2",
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    round_to: RoundTo = AUTO,
    latency: bool = True,
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Params, FLOPs and (``latency=True``) onnxruntime latency of the model compacted at each ratio.

    One analysis serves every ratio. Each row: ``ratio, round_to, params, flops, params_frac,
    flops_frac, ideal_speedup`` and, when timed, ``latency_ms, p10_ms, p90_ms, baseline_ms`` (the
    original timed interleaved with that row's model), ``speedup, efficiency``. Rows follow the
    order of ``ratios``; ``callback(row)`` is called as each one is ready.
    """
    from graphprune.planning.plan import check_ratio

    ratios = [check_ratio(r) for r in ratios]
    if not ratios:
        raise InputError("sweep needs at least one ratio")
    (n_round,) = _round_choices(round_to)
    s = Search(model, example_input, importance=importance, ignored_layers=ignored_layers,
                prune_hidden=prune_hidden, attention=attention, runs=runs, warmup=warmup,
                threads=threads)
    rows: list[dict[str, Any]] = []
    try:
        for r in tqdm(ratios, desc="graphprune sweep", disable=not progress, dynamic_ncols=True):
            plan = s.plan(r, round_to=n_round)
            small, plan = s.realize(plan) if plan.slices else (model, plan)
            params = count_params(small)
            flops = count_flops(small, example_input) if plan.slices else s.flops
            c = Candidate(
                ratio=r,
                params=params,
                flops=flops,
                params_frac=params / s.params if s.params else 1.0,
                flops_frac=flops / s.flops if s.flops else 1.0,
                round_to=n_round,
            )
            if latency:
                c = s.measure(c, model=small)
            row = c.to_dict()
            for k in ("step", "chosen"):
                row.pop(k)
            row["groups_pruned"] = sum(1 for g in plan.groups if g.removed)
            rows.append(row)
            if callback is not None:
                callback(row)
    finally:
        s.close()
    return rows
