"""The machinery of a target search: one analysis, a ladder of candidate plans, and the searches.

* The **ladder** orders single-group removal steps by the uniform ratio at which each happens,
  so step ``t`` is "the uniform ratio, refined per group" (``Ladder``, ``allowed_kept``).
* ``Search`` holds one analysis and turns ladder steps into plans, compact models, static
  counts (on a ``meta`` twin where possible) and onnxruntime timings.
* ``static_search`` bisects the ladder for a FLOPs / params fraction; ``speed_search`` for a
  measured speed-up or latency; ``choose_round_to_at`` picks the fastest ``round_to``.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from graphprune.engine import importance_name, prepare, realize
from graphprune.export.bench import count_flops, count_params, default_threads, interleaved_latency
from graphprune.graph.analysis import Analysis, Group
from graphprune.planning.cut import CutOptions, round_keep
from graphprune.planning.importance import Criterion
from graphprune.planning.plan import Plan, build_plan
from graphprune.search.results import Candidate


def allowed_kept(group: Group, round_to: int) -> list[int]:
    """Kept-unit counts allowed for ``group``, descending, starting with all units.

    A count is allowed when ``graphprune.planning.cut.round_keep`` leaves it unchanged, so the ladder
    and ``compact(round_to=N)`` agree on which widths are hardware-friendly (a head of 64
    features is a multiple of 8 by itself; a group too small to round is pruned unrounded).
    """
    n = group.num_units
    if round_to <= 1:
        return list(range(n, 0, -1))
    return [n] + [k for k in range(n - 1, 0, -1) if round_keep(group, k, round_to) == k]


class Ladder:
    """Removal steps of single groups, sorted by the uniform ratio at which each one happens.

    Group ``g`` with ``n`` units moving from ``a`` kept units to the next allowed ``b`` does so at
    ratio ``1 - (a + b) / (2n)`` (where rounding ``n * (1 - ratio)`` to the nearer width
    switches), so step ``t`` of the ladder equals a uniform ratio at ties and refines it one
    group at a time in between. Removal counts only grow with ``t``: FLOPs and parameters fall
    monotonically along it.
    """

    def __init__(self, analysis: Analysis, round_to: int = 1) -> None:
        self.round_to = int(round_to)
        self.units = {g.index: g.num_units for g in analysis.groups if g.members and g.num_units > 1}
        events: list[tuple[float, int, int]] = []
        for g in analysis.groups:
            if g.index not in self.units:
                continue
            kept = allowed_kept(g, self.round_to)
            n = g.num_units
            for a, b in zip(kept, kept[1:]):
                events.append((1.0 - (a + b) / (2.0 * n), g.index, n - b))
        events.sort()
        self.thresholds = [e[0] for e in events]
        self._events = [(e[1], e[2]) for e in events]
        self.total_units = sum(self.units.values())

    def __len__(self) -> int:
        return len(self._events)

    def counts(self, step: int, extra: int | None = None) -> dict[int, int]:
        """Units removed per group after the first ``step`` steps (every prunable group listed).

        ``extra`` applies one later step as well (the group jumps ahead alone): between two
        adjacent steps whose fractions straddle a target, this fills the gap a big group leaves.
        """
        out = dict.fromkeys(self.units, 0)
        for gi, removed in self._events[:step]:
            out[gi] = removed
        if extra is not None:
            gi, removed = self._events[extra]
            out[gi] = max(out[gi], removed)
        return out

    def event_units(self, index: int) -> int:
        """Units of the group that ladder step ``index`` shrinks."""
        return self.units[self._events[index][0]]

    def step_for_ratio(self, ratio: float) -> int:
        """The step at which every group is at its nearest allowed width for uniform ``ratio``."""
        return bisect.bisect_right(self.thresholds, ratio)


def _memo(criterion: Criterion) -> Criterion:
    """Scores depend only on the group and the (never sliced) analysis model: compute them once."""
    cache: dict[int, Any] = {}

    def score(group: Group, model: nn.Module) -> Any:
        if group.index not in cache:
            cache[group.index] = criterion(group, model)
        return cache[group.index]

    score.__name__ = getattr(criterion, "__name__", "custom")
    return score


class Search:
    """Shared state of a search or sweep: the analysis, cached scores, originals and timings."""

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        importance: Any = "l2",
        ignored_layers: Any = (),
        prune_hidden: bool = False,
        attention: str = "heads",
        data: Any = None,
        loss_fn: Any = None,
        runs: int = 20,
        warmup: int = 5,
        threads: int | None = None,
        fallback: str = "freeze",
    ) -> None:
        self.fallback = fallback  # what realize does when the user's class cannot run smaller
        self.model = model
        self.x = example_input
        self.analysis, criterion = prepare(
            model,
            example_input,
            importance,
            ignored_layers,
            data=data,
            loss_fn=loss_fn,
            prune_hidden=prune_hidden,
            attention=attention,
        )
        self.criterion = _memo(criterion)
        self.importance = importance_name(importance)
        self.params = count_params(model)
        self.flops = count_flops(model, example_input)
        self.runs, self.warmup = runs, warmup
        self.threads = threads or default_threads()
        self._ladders: dict[int, Ladder] = {}
        self._static: dict[Any, Candidate] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._baseline: Path | None = None
        self._n_exports = 0
        self._meta: tuple[Analysis, Any] | bool | None = None

    # -- plans and models ------------------------------------------------------------------------
    def ladder(self, round_to: int) -> Ladder:
        if round_to not in self._ladders:
            self._ladders[round_to] = Ladder(self.analysis, round_to)
        return self._ladders[round_to]

    def plan(
        self,
        ratio: float | None = None,
        *,
        round_to: int = 1,
        step: int | None = None,
        extra: int | None = None,
    ) -> Plan:
        """A plan at a uniform ``ratio`` (``round_to`` 1) or at a ladder ``step`` (+ ``extra``)."""
        if step is None:  # a uniform ratio, rounded the way compact(round_to=N) rounds
            opts = CutOptions(round_to=round_to if round_to > 1 else None)
            r = float(ratio or 0.0)
            return build_plan(self.analysis, r, self.criterion, self.importance, options=opts)
        lad = self.ladder(round_to)
        counts = lad.counts(step, extra)
        eff = sum(counts.values()) / lad.total_units if lad.total_units else 0.0
        return build_plan(self.analysis, min(eff, 0.999999), self.criterion, self.importance, counts=counts)

    def realize(self, plan: Plan, *, quiet: bool = True) -> tuple[nn.Module, Plan]:
        """Surgery on a copy (the analysis stays reusable); graph-fallback warnings muted if quiet.

        Returns the model and the plan describing it (modules kept whole have their units dropped).
        """
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return realize(self.analysis, plan, self.x, copy_model=True, fallback=self.fallback)

    def plan_of(self, c: Candidate) -> Plan:
        return self.plan(c.ratio, round_to=c.round_to, step=c.step, extra=c.extra)

    def _meta_twin(self) -> tuple[Analysis, Any] | None:
        """The analysis with its model and input on the ``meta`` device (None if that fails).

        Params and FLOPs depend on shapes only; surgery and a forward pass on meta tensors
        propagate shapes without computing, which makes each static candidate cheap.
        """
        if self._meta is None:
            try:
                twin = copy.deepcopy(self.analysis.model).to("meta")
                x = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, self.x)
                self._meta = (dataclasses.replace(self.analysis, model=twin), x)
            except Exception:  # noqa: BLE001 - meta is an optimisation; the real path always works
                self._meta = False
        return self._meta or None

    def _static_counts(self, plan: Plan) -> tuple[int, int]:
        """(params, FLOPs) of the plan's compact model: on the meta twin when it can run there."""
        twin = self._meta_twin()
        if twin is not None:
            analysis, x = twin
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small, _ = realize(analysis, plan, x, copy_model=True, fallback=self.fallback)
                if any(p.is_meta for p in small.parameters()):
                    return count_params(small), count_flops(small, x)
            except Exception:  # noqa: BLE001 - data-dependent ops may need real tensors
                self._meta = False
        small, _ = self.realize(plan)
        return count_params(small), count_flops(small, self.x)

    def evaluate(
        self,
        plan: Plan,
        key: Any,
        *,
        round_to: int = 1,
        step: int | None = None,
        extra: int | None = None,
    ) -> Candidate:
        """Params and FLOPs of the plan's compact model (cached by ``key``)."""
        if key not in self._static:
            params, flops = (self.params, self.flops) if not plan.slices else self._static_counts(plan)
            self._static[key] = Candidate(
                ratio=plan.ratio,
                params=params,
                flops=flops,
                params_frac=params / self.params if self.params else 1.0,
                flops_frac=flops / self.flops if self.flops else 1.0,
                round_to=round_to,
                step=step,
                extra=extra,
            )
        return self._static[key]

    def at_step(self, round_to: int, step: int, extra: int | None = None) -> Candidate:
        lad = self.ladder(round_to)
        step = max(0, min(step, len(lad)))
        plan = self.plan(round_to=round_to, step=step, extra=extra)
        return self.evaluate(plan, (round_to, step, extra), round_to=round_to, step=step, extra=extra)

    # -- latency -------------------------------------------------------------------------------
    def _dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="graphprune-target-")
        return Path(self._tmp.name)

    def _export(self, model: nn.Module, name: str) -> tuple[Path, str]:
        from graphprune.export.onnx_export import export_onnx

        res = export_onnx(model, self.x, self._dir() / f"{name}.onnx", check=False)
        return res.path, res.exporter

    def baseline_path(self) -> Path:
        if self._baseline is None:
            self._baseline, _ = self._export(self.model, "original")
        return self._baseline

    def measure(self, cand: Candidate, model: nn.Module | None = None, plan: Plan | None = None) -> Candidate:
        """Time ``cand`` (its model given, or realised from ``plan``) interleaved with the original.

        Returns a new Candidate with the latency fields filled (the static cache is not touched,
        so the same plan can be timed again, e.g. with another round_to, without confusion).
        """
        if model is None:
            model = self.realize(plan)[0] if plan is not None and plan.slices else self.model
        self._n_exports += 1
        path, exporter = self._export(model, f"candidate{self._n_exports}")
        base, lat = interleaved_latency(
            [self.baseline_path(), path], self.x, warmup=self.warmup, runs=self.runs, threads=self.threads
        )
        path.unlink(missing_ok=True)
        out = dataclasses.replace(cand)
        out.latency_ms, out.p10_ms, out.p90_ms = lat.median_ms, lat.p10_ms, lat.p90_ms
        out.baseline_ms, out.exporter = base.median_ms, exporter
        return out

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, progress: bool) -> Iterator[Any]:
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def bisect_steps(
    f: Callable[[int], Candidate],
    frac: Callable[[Candidate], float],
    target: float,
    lo: int,
    hi: int,
    c_lo: Candidate,
    c_hi: Candidate,
    tolerance: float,
) -> tuple[int, int, Candidate, Candidate]:
    """Shrink ``[lo, hi]`` with ``frac(f(lo)) > target >= frac(f(hi))`` (``frac`` falls with k).

    Interpolation steps alternate with halvings: logarithmic in the worst case, a handful of
    evaluations on smooth curves. Stops early once ``f(hi)`` is within ``tolerance / 4``.
    """
    interpolate = True
    while hi - lo > 1 and abs(frac(c_hi) / target - 1) > tolerance / 4:
        mid = (lo + hi) // 2
        if interpolate:
            span = frac(c_lo) - frac(c_hi)
            guess = lo + (frac(c_lo) - target) / span * (hi - lo) if span > 0 else mid
            mid = min(hi - 1, max(lo + 1, int(round(guess))))
        interpolate = not interpolate
        c = f(mid)
        if frac(c) > target:
            lo, c_lo = mid, c
        else:
            hi, c_hi = mid, c
    return lo, hi, c_lo, c_hi


def static_search(
    s: Search, kind: str, target: float, round_to: int, tolerance: float, bar: Any
) -> Candidate:
    """Ladder position whose FLOPs/params fraction is closest to ``target``.

    1. Bisect the ladder: the fraction falls monotonically along it, so the search ends at two
       adjacent steps straddling the target (or earlier, once within tolerance).
    2. If that last step is one big group jumping past the target, apply it *early* instead: on
       top of the first ``k < lo`` steps, for the ``k`` that brings the fraction closest. Those
       positions also fall monotonically in ``k``, so this is a second bisection.
    """
    lad = s.ladder(round_to)
    frac = (lambda c: c.flops_frac) if kind == "flops" else (lambda c: c.params_frac)

    def at(step: int, extra: int | None = None) -> Candidate:
        c = s.at_step(round_to, step, extra)
        bar.update(1)
        bar.set_postfix_str(f"ratio {c.ratio:.3f}: {kind} {frac(c):.1%}")
        return c

    def close(c: Candidate) -> bool:
        return abs(frac(c) / target - 1) <= tolerance / 4

    lo, hi = 0, len(lad)
    c_lo, c_hi = at(lo), at(hi)
    if frac(c_lo) <= target:
        return c_lo
    if frac(c_hi) <= target:
        lo, hi, c_lo, c_hi = bisect_steps(at, frac, target, lo, hi, c_lo, c_hi, tolerance)
        if hi - lo == 1 and lo > 0 and not close(c_hi) and not close(c_lo):
            jump = hi - 1
            c0 = at(0, jump)
            if frac(c0) > target:
                bisect_steps(lambda k: at(k, jump), frac, target, 0, lo, c0, c_hi, tolerance)
    tried = [c for c in s._static.values() if c.round_to == round_to and c.step is not None]
    return min(tried, key=lambda c: (abs(frac(c) - target), c.step or 0, c.extra or 0))


def speed_search(
    s: Search,
    kind: str,
    target: float,
    round_to: int,
    tolerance: float,
    max_candidates: int,
    bar: Any,
    tried: list[Candidate],
) -> Candidate:
    """Least-pruned ladder step whose measured speed meets ``target`` (bisection on measurements).

    The first probe is the step whose FLOPs match the target's ideal (FLOPs fraction = 1 /
    speed-up); while every probe misses, the next asks FLOPs for as much more as the last one
    fell short; then probes bisect between the furthest miss and the nearest hit until the
    bracket is narrower than 2 % of the ladder, the hit is within ``tolerance`` of the target,
    or ``max_candidates`` were timed. Measurements are noisy: a miss beyond a hit is ignored.
    """
    lad = s.ladder(round_to)

    def meets(c: Candidate) -> bool:
        if kind == "speedup":
            return c.speedup is not None and c.speedup >= target
        return c.latency_ms is not None and c.latency_ms <= target

    def timed(step: int) -> Candidate:
        step = max(0, min(step, len(lad)))
        for c in tried:
            if c.step == step and c.round_to == round_to:
                return c
        static = s.at_step(round_to, step)
        c = s.measure(static, plan=s.plan(round_to=round_to, step=step))
        tried.append(c)
        bar.update(1)
        bar.set_postfix_str(f"ratio {c.ratio:.3f}: {c.latency_ms:.2f} ms, {c.speedup:.2f}x")
        return c

    def ideal_step(flops_frac: float) -> int:
        with progress_bar(None, "", False) as quiet:
            return static_search(s, "flops", max(flops_frac, 1e-6), round_to, tolerance, quiet).step or 0

    def need(c: Candidate) -> float:  # the speed-up this candidate's own baseline asks for
        return target if kind == "speedup" else (c.baseline_ms or target) / target

    def hit_is_close(step: int) -> bool:  # the hit is barely over the target: no need to go on
        c = next(c for c in tried if c.step == step and c.round_to == round_to)
        return c.speedup is not None and c.speedup <= need(c) * (1 + tolerance)

    # Probe 1: where FLOPs say the target should be (a latency target needs the original's time).
    base_ms = timed(0).baseline_ms if kind == "latency_ms" else None
    want = 1.0 / target if kind == "speedup" else target / (base_ms or target)
    n_steps = len(lad)
    min_gap = max(1, int(0.02 * n_steps))
    lo, hi = 0, None  # lo: the furthest step that misses; hi: the nearest step that meets
    probe = ideal_step(min(1.0, want))
    for _ in range(3 * max_candidates):
        if len(tried) >= max_candidates:
            break
        c = timed(probe)
        step = c.step or 0
        if meets(c):
            hi = step if hi is None else min(hi, step)
        elif hi is None or step < hi:  # a miss beyond a hit is noise: ignore it
            lo = max(lo, step)
        if hi is None:
            if lo >= n_steps:
                break
            # Extrapolate: ask FLOPs for as much more as the measurement fell short, a bit beyond.
            nxt = ideal_step(c.flops_frac * (c.speedup or 1.0) / need(c) * 0.95)
            probe = nxt if nxt > lo else (lo + n_steps + 1) // 2
            continue
        if hi - lo <= min_gap or hit_is_close(hi):
            break
        probe = (lo + hi) // 2
    hits = [c for c in tried if c.round_to == round_to and meets(c)]
    if hits:
        return min(hits, key=lambda c: c.step or 0)
    return max((c for c in tried if c.round_to == round_to), key=lambda c: c.speedup or 0.0)


def choose_round_to_at(
    s: Search, kind: str, value: float, choices: Sequence[int], bar: Any
) -> tuple[int, list[Candidate]]:
    """Time each ``round_to`` at the FLOPs-ideal point of a speed target; return the fastest."""
    if kind == "speedup":
        want = 1.0 / value
    else:
        want = value / s.measure(s.at_step(1, 0)).baseline_ms  # type: ignore[operator]
    probes = []
    with progress_bar(None, "", False) as quiet:
        for n in choices:
            c = static_search(s, "flops", min(1.0, want), n, 0.02, quiet)
            probes.append(s.measure(c, plan=s.plan_of(c)))
            bar.update(1)
    best = min(probes, key=lambda c: c.latency_ms or math.inf)
    return best.round_to, probes
