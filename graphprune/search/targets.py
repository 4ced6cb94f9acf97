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
  whole: a unit of ``u`` positions counts ``u`` channels); ``round_to="measured"`` tries 1, 8, 16
  and 32 and keeps the one whose compact model runs fastest in onnxruntime.
* Speed targets export each candidate to ONNX and time it in onnxruntime interleaved with the
  original (warm-up, repeated runs, median), so load drift hits both alike; the search keeps the
  least-pruned candidate that meets the target.

Every candidate tried is kept in :attr:`TargetResult.candidates` and printed by ``str(result)``.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from graphprune.errors import InputError
from graphprune.export.bench import _interleaved_latency, count_flops, count_params, default_threads
from graphprune.graph.analysis import Analysis, Group
from graphprune.planning.cut import CutOptions, round_keep
from graphprune.planning.importance import Criterion
from graphprune.planning.plan import Plan, build_plan
from graphprune.surgery.fallback import check_fallback

__all__ = [
    "ROUND_CHOICES",
    "Candidate",
    "Ladder",
    "TargetResult",
    "best_round_to",
    "check_targets",
    "compact_to_target",
    "sweep",
    "targeted",
]

ROUND_CHOICES = (1, 8, 16, 32)
_KINDS = ("flops", "params", "speedup", "latency_ms")


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Candidate:
    """One compact model tried by a search or a sweep (fractions are of the original)."""

    ratio: float  # fraction of the prunable units removed
    params: int
    flops: int
    params_frac: float
    flops_frac: float
    round_to: int = 1
    step: int | None = None  # position on the ladder (None for plain-ratio sweeps)
    extra: int | None = None  # one later ladder step applied on top (fine-tuning a target)
    latency_ms: float | None = None  # onnxruntime median
    p10_ms: float | None = None
    p90_ms: float | None = None
    baseline_ms: float | None = None  # the original, timed interleaved with this candidate
    exporter: str | None = None
    chosen: bool = False

    @property
    def ideal_speedup(self) -> float | None:
        """original FLOPs / compact FLOPs: the speed-up latency would show if it followed FLOPs."""
        return 1.0 / self.flops_frac if self.flops_frac > 0 else None

    @property
    def speedup(self) -> float | None:
        if self.latency_ms is None or self.baseline_ms is None or self.latency_ms <= 0:
            return None
        return self.baseline_ms / self.latency_ms

    @property
    def efficiency(self) -> float | None:
        """measured speed-up / ideal speed-up (1.0: latency fell exactly as much as FLOPs)."""
        s, i = self.speedup, self.ideal_speedup
        return None if s is None or i is None else s / i

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ideal_speedup=self.ideal_speedup, speedup=self.speedup, efficiency=self.efficiency)
        return d


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def candidates_table(cands: Sequence[Candidate]) -> str:
    """A fixed-width table of candidates (chosen one marked with ``*``)."""
    head = ("", "ratio", "round", "params", "FLOPs", "latency ms", "base ms", "speed-up", "ideal", "eff.")
    rows = [head]
    for c in cands:
        rows.append(
            (
                "*" if c.chosen else "",
                f"{c.ratio:.3f}",
                str(c.round_to),
                f"{c.params_frac:.1%}",
                f"{c.flops_frac:.1%}",
                _fmt(c.latency_ms, ".3f"),
                _fmt(c.baseline_ms, ".3f"),
                _fmt(c.speedup, ".2f"),
                _fmt(c.ideal_speedup, ".2f"),
                _fmt(c.efficiency, ".0%"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@dataclass
class TargetResult:
    """The compact model that meets (or comes closest to) a target, and every candidate tried."""

    model: nn.Module
    plan: Plan
    target: str  # e.g. "FLOPs <= 50% of the original"
    met: bool
    original_params: int
    original_flops: int
    candidates: list[Candidate] = field(default_factory=list)
    note: str = ""
    kind: str = ""  # "flops", "params", "speedup" or "latency_ms"
    value: float | None = None  # the target asked for

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "value": self.value,
            "met": self.met,
            "original_params": self.original_params,
            "original_flops": self.original_flops,
            "note": self.note,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def __str__(self) -> str:
        c = self.chosen
        lines = [
            f"target: {self.target} -> {'met' if self.met else 'NOT met'}: chosen ratio {c.ratio:.3f} "
            f"(round_to {c.round_to}), params {c.params_frac:.1%}, FLOPs {c.flops_frac:.1%}"
            + (f", speed-up {c.speedup:.2f}x" if c.speedup is not None else ""),
            f"{len(self.candidates)} candidates tried:",
            candidates_table(self.candidates),
        ]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The ladder: per-group removal counts ordered by the uniform ratio at which they happen


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


# --------------------------------------------------------------------------------------------------
# One analysis, many candidates


def _memo(criterion: Criterion) -> Criterion:
    """Scores depend only on the group and the (never sliced) analysis model: compute them once."""
    cache: dict[int, Any] = {}

    def score(group: Group, model: nn.Module) -> Any:
        if group.index not in cache:
            cache[group.index] = criterion(group, model)
        return cache[group.index]

    score.__name__ = getattr(criterion, "__name__", "custom")
    return score


class _Search:
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
        from graphprune.api import _importance_name, _prepare

        self.fallback = fallback  # what _realize does when the user's class cannot run smaller
        self.model = model
        self.x = example_input
        self.analysis, criterion = _prepare(
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
        self.importance = _importance_name(importance)
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

    def realize(self, plan: Plan, *, quiet: bool = True) -> nn.Module:
        """Surgery on a copy (the analysis stays reusable); graph-fallback warnings muted if quiet."""
        from graphprune.api import _realize

        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return _realize(self.analysis, plan, self.x, copy_model=True, fallback=self.fallback)

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
        from graphprune.api import _realize

        twin = self._meta_twin()
        if twin is not None:
            analysis, x = twin
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small = _realize(analysis, plan, x, copy_model=True, fallback=self.fallback)
                if any(p.is_meta for p in small.parameters()):
                    return count_params(small), count_flops(small, x)
            except Exception:  # noqa: BLE001 - data-dependent ops may need real tensors
                self._meta = False
        small = self.realize(plan)
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
            model = self.realize(plan) if plan is not None and plan.slices else self.model
        self._n_exports += 1
        path, exporter = self._export(model, f"candidate{self._n_exports}")
        base, lat = _interleaved_latency(
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
def _bar(total: int | None, desc: str, progress: bool) -> Iterator[Any]:
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# Searches


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


def _bisect(
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


def _static_search(
    s: _Search, kind: str, target: float, round_to: int, tolerance: float, bar: Any
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
        lo, hi, c_lo, c_hi = _bisect(at, frac, target, lo, hi, c_lo, c_hi, tolerance)
        if hi - lo == 1 and lo > 0 and not close(c_hi) and not close(c_lo):
            jump = hi - 1
            c0 = at(0, jump)
            if frac(c0) > target:
                _bisect(lambda k: at(k, jump), frac, target, 0, lo, c0, c_hi, tolerance)
    tried = [c for c in s._static.values() if c.round_to == round_to and c.step is not None]
    return min(tried, key=lambda c: (abs(frac(c) - target), c.step or 0, c.extra or 0))


def _speed_search(
    s: _Search,
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
        with _bar(None, "", False) as quiet:
            return _static_search(s, "flops", max(flops_frac, 1e-6), round_to, tolerance, quiet).step or 0

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


def _describe(kind: str, value: float) -> str:
    return {
        "flops": f"FLOPs <= {value:.1%} of the original",
        "params": f"params <= {value:.1%} of the original",
        "speedup": f"measured speed-up >= {value:.2f}x",
        "latency_ms": f"measured latency <= {value:.3f} ms",
    }[kind]


def _round_choices(round_to: int | str) -> tuple[int, ...]:
    if round_to == "measured":
        return ROUND_CHOICES
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to must be a positive int or 'measured', got {round_to!r}")
    return (int(round_to),)


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
    round_to: int | str = 1,
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
    * ``round_to``: kept widths are multiples of it; ``"measured"`` tries 1, 8, 16, 32 and keeps
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
    s = _Search(source, example_input, importance=importance, ignored_layers=ignored_layers,
                prune_hidden=prune_hidden, attention=attention, data=data, loss_fn=loss_fn, runs=runs,
                warmup=warmup,
                threads=threads, fallback=check_fallback(fallback))
    tried: list[Candidate] = []
    note = ""
    try:
        with _bar(None, f"graphprune target {kind}", progress) as bar:
            if kind in ("flops", "params"):
                finals = [_static_search(s, kind, value, n, tolerance, bar) for n in choices]
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
            else:
                n = choices[0]
                if len(choices) > 1:
                    n, probes = _choose_round_to_at(s, kind, value, choices, bar)
                    tried.extend(probes)
                    note = "round_to chosen by measured latency at the first probe: " + ", ".join(
                        f"{c.round_to}: {c.latency_ms:.3f} ms" for c in probes
                    )
                best = _speed_search(s, kind, value, n, tolerance, max_candidates, bar, tried)
        for c in tried:
            c.chosen = c is best
        if not any(c.chosen for c in tried):
            best.chosen = True
            tried.append(best)
        tried.sort(key=lambda c: (c.round_to, c.ratio))
        plan = s.plan_of(best)
        if rec:
            plan = recon.reconstructed_plan(s.analysis, plan, data, rec, None, progress=progress)
        small = s.realize(plan, quiet=False)
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
        warnings.warn(f"graphprune: target {_describe(kind, value)} not met; closest candidate kept ({why})",
                      stacklevel=2)
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


def _choose_round_to_at(
    s: _Search, kind: str, value: float, choices: Sequence[int], bar: Any
) -> tuple[int, list[Candidate]]:
    """Time each ``round_to`` at the FLOPs-ideal point of a speed target; return the fastest."""
    if kind == "speedup":
        want = 1.0 / value
    else:
        want = value / s.measure(s.at_step(1, 0)).baseline_ms  # type: ignore[operator]
    probes = []
    with _bar(None, "", False) as quiet:
        for n in choices:
            c = _static_search(s, "flops", min(1.0, want), n, 0.02, quiet)
            probes.append(s.measure(c, plan=s.plan_of(c)))
            bar.update(1)
    best = min(probes, key=lambda c: c.latency_ms or math.inf)
    return best.round_to, probes


def best_round_to(
    model: nn.Module,
    example_input: Any,
    ratio: float = 0.5,
    *,
    choices: Sequence[int] = ROUND_CHOICES,
    importance: str | Criterion = "l2",
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[int, list[Candidate]]:
    """Which ``round_to`` makes the model compacted at ``ratio`` run fastest in onnxruntime.

    Each choice rounds every group to its nearest allowed width at ``ratio`` (so FLOPs stay
    comparable); all candidates are timed interleaved with the original. Returns the winner and
    the measured candidates (compare ``latency_ms`` and ``efficiency``).
    """
    s = _Search(model, example_input, importance=importance, ignored_layers=ignored_layers,
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


def sweep(
    model: nn.Module,
    example_input: Any,
    ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    *,
    importance: str | Criterion = "l2",
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    round_to: int = 1,
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
    s = _Search(model, example_input, importance=importance, ignored_layers=ignored_layers,
                prune_hidden=prune_hidden, attention=attention, runs=runs, warmup=warmup,
                threads=threads)
    rows: list[dict[str, Any]] = []
    try:
        for r in tqdm(ratios, desc="graphprune sweep", disable=not progress, dynamic_ncols=True):
            plan = s.plan(r, round_to=n_round)
            small = s.realize(plan) if plan.slices else model
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
