"""What a target search or a sweep returns: the candidates it tried and the one it chose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from graphprune.planning.plan import Plan


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
