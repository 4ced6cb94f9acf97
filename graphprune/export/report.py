"""Pictures of what pruning did: per-layer widths before/after, latency and speed-up vs ratio.

Why pictures: a table of 50 layer shapes hides the pattern (which stages lost most, which layers
were left whole); a bar chart shows it at a glance. A latency-vs-ratio curve shows where the
measured speed-up stops following the FLOPs, which a single benchmark cannot.

matplotlib is an optional dependency (``pip install graphprune[plot]``); these functions raise a
clear ImportError without it. They use matplotlib's object API (``Figure`` + Agg canvas), never
``pyplot``, so they do not touch the caller's global plotting state or need a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["layer_out_widths", "plot_candidates", "plot_sweep", "plot_widths"]

_BEFORE = "#c8c8c8"
_AFTER = "#1f77b4"
_IDEAL = "#ff7f0e"


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "graphprune's plots need matplotlib: pip install 'graphprune[plot]' (or pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# --------------------------------------------------------------------------------------------------
# Per-layer widths


def _out_width(module: nn.Module) -> int | None:
    """The width a layer produces: channels of a conv, features of a linear, dim of an embedding."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.weight.shape[1] * module.groups if module.transposed else module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return int(module.weight.shape[0])
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return int(module.weight.shape[1])
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
        return int(module.weight.shape[1])  # Hugging Face GPT-2 Conv1D stores (in, out)
    return None


def layer_out_widths(model: nn.Module) -> dict[str, int]:
    """``{layer: output width}`` for every conv / linear / embedding, in module order."""
    out = {}
    for name, module in model.named_modules():
        w = _out_width(module)
        if w is not None:
            out[name or "<root>"] = w
    return out


def _widths_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Output widths from a BenchmarkReport's weight shapes (norm vectors skipped: they repeat)."""
    return {k: int(v[0]) for k, v in shapes.items() if len(v) >= 2}


def _as_widths(obj: Any) -> dict[str, int]:
    if isinstance(obj, nn.Module):
        return layer_out_widths(obj)
    if isinstance(obj, Mapping):
        return {k: (int(v) if isinstance(v, int) else int(v[0])) for k, v in obj.items()}
    raise TypeError(f"expected a model or a {{layer: width}} mapping, got {type(obj).__name__}")


def plot_widths(
    original: Any,
    compact: Any = None,
    path: str | os.PathLike = "widths.png",
    *,
    title: str | None = None,
    max_labels: int = 60,
) -> Path:
    """Bar chart of every layer's output width, before (grey) and after (blue); PNG at ``path``.

    ``original`` / ``compact`` are models (conv / linear / embedding output widths) or
    ``{layer: width}`` mappings; or pass a :class:`graphprune.BenchmarkReport` as ``original``
    alone (its weight shapes are used). The lower panel shows the share of each layer kept, so
    small layers next to a 1000-way classifier stay readable.
    """
    if compact is None and hasattr(original, "widths_before"):
        before = _widths_from_shapes(original.widths_before)
        after = _widths_from_shapes(original.widths_after)
    else:
        if compact is None:
            raise TypeError("plot_widths needs the compact model (or a BenchmarkReport alone)")
        before, after = _as_widths(original), _as_widths(compact)
    names = [n for n in before if n in after]
    if not names:
        raise ValueError("no layers in common between the two models")
    b = [before[n] for n in names]
    a = [after[n] for n in names]
    kept = [x / y if y else 1.0 for x, y in zip(a, b)]
    n = len(names)
    fig = _figure(min(max(7.0, 0.16 * n + 3.0), 26.0), 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1.0])
    xs = range(n)
    top.bar(xs, b, width=0.85, color=_BEFORE, label=f"before ({sum(b):,} in all)")
    top.bar(xs, a, width=0.55, color=_AFTER, label=f"after ({sum(a):,} in all)")
    top.set_ylabel("output width (channels / features)")
    if max(b) / max(1, min(b)) > 30:
        top.set_yscale("log")
    top.legend(loc="upper left", fontsize=9, frameon=False)
    changed = sum(1 for x, y in zip(a, b) if x != y)
    top.set_title(title or f"layer widths: {changed} of {n} layers narrower", fontsize=11)
    top.grid(axis="y", alpha=0.3)
    bottom.bar(xs, [k * 100 for k in kept], width=0.7, color=[_AFTER if k < 1 else _BEFORE for k in kept])
    bottom.set_ylim(0, 105)
    bottom.set_ylabel("kept %")
    bottom.axhline(100, color="#888888", lw=0.6)
    bottom.grid(axis="y", alpha=0.3)
    step = max(1, -(-n // max_labels))
    ticks = list(range(0, n, step))
    bottom.set_xticks(ticks)
    bottom.set_xticklabels([_short(names[i]) for i in ticks], rotation=90, fontsize=7)
    bottom.set_xlim(-0.7, n - 0.3)
    if step > 1:
        bottom.set_xlabel(f"layers in module order (every {step}th named)", fontsize=9)
    return _save(fig, path)


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


# --------------------------------------------------------------------------------------------------
# Sweeps and searches


def _col(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


_SERIES = ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#8c564b")


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike = "sweep.png",
    *,
    title: str | None = None,
) -> Path:
    """Latency vs ratio (left) and measured vs ideal speed-up (right) from :func:`sweep` rows.

    Left: onnxruntime median latency with its p10-p90 band, and the original's latency (timed
    interleaved with each row) as a dashed line. Right: measured speed-up and the ideal one
    (original FLOPs / compact FLOPs); the gap between them is what FLOPs do not buy. Rows from
    sweeps with different ``round_to`` are drawn as separate series, so hardware-friendly widths
    can be compared. Rows without latency (``sweep(latency=False)``) give a size-only picture.
    """
    if not rows:
        raise ValueError("no sweep rows to plot")
    series: dict[Any, list[Mapping[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["ratio"]):
        series.setdefault(r.get("round_to", 1), []).append(r)
    many = len(series) > 1
    timed = any(r.get("latency_ms") is not None for r in rows)
    fig = _figure(11.0, 4.4)
    left, right = fig.subplots(1, 2)
    for k, (rt, rs) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
        color = _SERIES[k % len(_SERIES)]
        tag = f"round_to={rt}: " if many else ""
        ratio = _col(rs, "ratio")
        if timed:
            lat, p10, p90 = _col(rs, "latency_ms"), _col(rs, "p10_ms"), _col(rs, "p90_ms")
            left.fill_between(ratio, p10, p90, color=color, alpha=0.15, lw=0,
                              label=None if many else "p10-p90")
            left.plot(ratio, lat, "o-", color=color, label=f"{tag}compact (median)")
            if k == 0:
                left.plot(ratio, _col(rs, "baseline_ms"), "--", color="#555555", label="original (median)")
        else:
            flops = [100 * v for v in _col(rs, "flops_frac")]
            params = [100 * v for v in _col(rs, "params_frac")]
            left.plot(ratio, flops, "o-", color=color, label=f"{tag}FLOPs")
            left.plot(ratio, params, "s:", color=color, label=f"{tag}params")
        right.plot(ratio, _col(rs, "ideal_speedup"), "s--", color=color if many else _IDEAL, alpha=0.7,
                   label=f"{tag}ideal (FLOPs ratio)")
        if timed:
            right.plot(ratio, _col(rs, "speedup"), "o-", color=color, label=f"{tag}measured")
            for x, sp, e in zip(ratio, _col(rs, "speedup"), _col(rs, "efficiency")):
                if sp == sp and e == e and x > 0:  # not NaN; ratio 0 is 100 % by definition
                    right.annotate(f"{e:.0%}", (x, sp), textcoords="offset points", xytext=(0, 6),
                                   ha="center", fontsize=7, color=color)
    if timed:
        left.set_ylabel("onnxruntime latency (ms)")
        left.set_ylim(bottom=0)
        left.set_title("latency vs ratio", fontsize=11)
    else:
        left.set_ylabel("% of the original kept")
        left.set_ylim(0, 105)
        left.set_title("size vs ratio", fontsize=11)
    left.set_xlabel("ratio (share of each group's units removed)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, frameon=False)
    right.axhline(1.0, color="#888888", lw=0.6)
    right.set_xlabel("ratio")
    right.set_ylabel("speed-up (x)")
    suffix = " (% = achieved of ideal)" if timed else ""
    right.set_title("speed-up: measured vs ideal" + suffix, fontsize=11)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_candidates(result: Any, path: str | os.PathLike = "search.png") -> Path:
    """The candidates a target search tried (``graphprune.search.targets.TargetResult``), chosen one ringed.

    Left: FLOPs (solid) and params (dotted) fractions vs ratio, one colour per ``round_to`` when
    several were tried. Right, when candidates were timed: measured vs ideal speed-up, each
    measured point labelled with its ``round_to`` if there were several.
    """
    cands = sorted(result.candidates, key=lambda c: (str(c.round_to), c.ratio))
    rounds = sorted({c.round_to for c in cands}, key=str)
    many = len(rounds) > 1
    timed = any(c.speedup is not None for c in cands)
    fig = _figure(10.5 if timed else 6.0, 4.2)
    axes = fig.subplots(1, 2 if timed else 1)
    ax = axes[0] if timed else axes
    for k, rt in enumerate(rounds):
        rs = [c for c in cands if c.round_to == rt]
        color = _SERIES[k % len(_SERIES)] if many else _AFTER
        tag = f"round_to={rt}: " if many else ""
        xs = [c.ratio for c in rs]
        ax.plot(xs, [100 * c.flops_frac for c in rs], "o-", color=color, label=f"{tag}FLOPs")
        ax.plot(xs, [100 * c.params_frac for c in rs], "s:", ms=4, color=color if many else _IDEAL,
                label=f"{tag}params")
    chosen = [c for c in cands if c.chosen]
    for c in chosen:
        ax.plot([c.ratio], [100 * c.flops_frac], "o", ms=13, mfc="none", mec="red", mew=1.5)
    kind, value = getattr(result, "kind", ""), getattr(result, "value", None)
    if kind in ("flops", "params") and value is not None:
        ax.axhline(100 * value, color="red", lw=0.8, ls=":", label=f"target ({kind})")
    ax.set_xlabel("ratio (share of prunable units removed)")
    ax.set_ylabel("% of the original kept")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"{len(cands)} candidates for: {result.target}", fontsize=10)
    if timed:
        ax2 = axes[1]
        pts = [c for c in cands if c.speedup is not None]
        ax2.plot([c.ratio for c in pts], [c.speedup for c in pts], "o", color=_AFTER, label="measured")
        ax2.plot([c.ratio for c in pts], [c.ideal_speedup for c in pts], "s", color=_IDEAL, label="ideal")
        if many:
            for c in pts:
                ax2.annotate(f"round_to {c.round_to}", (c.ratio, c.speedup), textcoords="offset points",
                             xytext=(0, -13), ha="center", fontsize=7, color=_AFTER)
        for c in chosen:
            if c.speedup is not None:
                ax2.plot([c.ratio], [c.speedup], "o", ms=13, mfc="none", mec="red", mew=1.5)
        if kind == "speedup" and value is not None:
            ax2.axhline(value, color="red", lw=0.8, ls=":", label="target")
        if max((c.ideal_speedup or 1.0) for c in pts) > 8:
            ax2.set_yscale("log")
        ax2.margins(x=0.15, y=0.1)  # room for the labels at the edges
        ax2.set_xlabel("ratio")
        ax2.set_ylabel("speed-up (x)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8, frameon=False)
        ax2.set_title("measured in onnxruntime (red ring: chosen)", fontsize=10)
    return _save(fig, path)
