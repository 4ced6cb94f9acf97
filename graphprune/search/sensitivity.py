"""Layer sensitivity: prune each group alone at several ratios and measure a metric you choose.

Uniform ratios treat every layer alike; networks do not. Some groups lose half their units
without noticing, others collapse at 10 %. :func:`sensitivity` measures that - one group at a
time, everything else intact - and returns a :class:`SensitivityTable` that prints, plots
(matplotlib, optional) and proposes per-group ratios for an overall target
(:meth:`SensitivityTable.propose`), ready to pass as ``compact(..., ratios=...)``.

Two ways to "prune a group alone":

* ``mode="mask"`` (default, fast): zero every parameter slice of the removed units. Because each
  unit's producer *and* consumer slices are zeroed, its contribution is gone exactly as if it
  had been removed (for the groups graphprune prunes by default; with ``prune_hidden=True``,
  LayerNorm statistics over a zeroed channel differ from those over a removed one). One
  analysis, then one evaluation per (group, ratio);
* ``mode="compact"``: a real compact model per (group, ratio), from the same analysis.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.engine import importance_name, prepare, realize
from graphprune.errors import InputError
from graphprune.graph.analysis import Group, param_tensor
from graphprune.planning.cut import key_matches, output_modules
from graphprune.planning.importance import Criterion, scores_for
from graphprune.planning.plan import check_ratio
from graphprune.search.pruner import zero_units


@dataclass
class SensitivityRow:
    group: int
    layers: str
    units: int
    key: str | int  # what to put in compact(..., ratios={key: r}) for this group
    metric: dict[float, float] = field(default_factory=dict)  # ratio -> metric


@dataclass
class SensitivityTable:
    baseline: float
    ratios: list[float]
    rows: list[SensitivityRow]
    higher_is_better: bool = True
    metric_name: str = "metric"

    def drop(self, row: SensitivityRow, ratio: float) -> float:
        """How much worse than the baseline (positive = worse), whatever the metric's direction."""
        if ratio == 0:
            return 0.0
        d = self.baseline - row.metric[ratio]
        return d if self.higher_is_better else -d

    def to_markdown(self) -> str:
        head = "| group | layers | units | " + " | ".join(f"{r:g}" for r in self.ratios) + " |"
        sep = "|---|---|---:|" + "---:|" * len(self.ratios)
        lines = [f"baseline {self.metric_name}: {self.baseline:.4g}", "", head, sep]
        for row in self.rows:
            vals = " | ".join(f"{row.metric[r]:.4g}" for r in self.ratios)
            lines.append(f"| {row.group} | {row.layers} | {row.units} | {vals} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(r.layers) for r in self.rows] + [6])
        width = min(width, 48)
        lines = [f"sensitivity ({self.metric_name}; baseline {self.baseline:.4g})"]
        head = " ".join(f"{r:>8g}" for r in self.ratios)
        lines.append(f"{'group':>5}  {'layers':<{width}} {'units':>5}  {head}")
        for row in self.rows:
            vals = " ".join(f"{row.metric[r]:>8.4g}" for r in self.ratios)
            lines.append(f"{row.group:>5}  {row.layers[:width]:<{width}} {row.units:>5}  {vals}")
        return "\n".join(lines)

    def plot(self, path: str | None = None, ax: Any = None) -> Any:
        """Metric against ratio, one line per group; saved to ``path`` if given. Returns the figure."""
        try:
            import matplotlib

            if path is not None and ax is None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise InputError("plotting needs matplotlib: pip install 'graphprune[plot]'") from exc
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4.5))
        else:
            fig = ax.figure
        xs = [0.0] + list(self.ratios)
        for row in self.rows:
            ys = [self.baseline] + [row.metric[r] for r in self.ratios]
            ax.plot(xs, ys, marker="o", label=row.layers[:40])
        ax.axhline(self.baseline, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("ratio of the group's units removed (this group alone)")
        ax.set_ylabel(self.metric_name)
        ax.set_title("graphprune layer sensitivity")
        if len(self.rows) <= 16:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def propose(self, target: float, *, max_drop: float | None = None) -> dict[str | int, float]:
        """Per-group ratios removing ``target`` of all units in total, cheapest drops first.

        Greedy: start with nothing removed; repeatedly move the group whose next measured ratio
        costs the least extra metric drop per unit removed, skipping steps whose drop exceeds
        ``max_drop``, until ``target`` of the units (summed over the table's groups) are gone.
        Sensitivities of groups are assumed to add up - a first-order guess; check the result.
        """
        target = check_ratio(target)
        total = sum(r.units for r in self.rows)
        level = {r.group: 0 for r in self.rows}  # index into [0] + ratios
        ladder = [0.0] + list(self.ratios)

        def removed(row: SensitivityRow, i: int) -> int:
            return int(round(ladder[i] * row.units))

        gone = 0
        while gone < target * total:
            best: tuple[float, SensitivityRow] | None = None
            for row in self.rows:
                i = level[row.group]
                if i + 1 >= len(ladder):
                    continue
                d_next = self.drop(row, ladder[i + 1])
                if max_drop is not None and d_next > max_drop:
                    continue
                du = removed(row, i + 1) - removed(row, i)
                if du <= 0:
                    cost = -np.inf
                else:
                    cost = (d_next - self.drop(row, ladder[i])) / du
                if best is None or cost < best[0]:
                    best = (cost, row)
            if best is None:
                break
            row = best[1]
            gone += removed(row, level[row.group] + 1) - removed(row, level[row.group])
            level[row.group] += 1
        return {row.key: ladder[level[row.group]] for row in self.rows if level[row.group] > 0}


def _ratios_key(group: Group, groups: list[Group], model: nn.Module) -> str | int:
    """A module path that selects only this group in ``ratios=`` (else the group index)."""
    owners = {g.index: output_modules(g, model) for g in groups}

    def readable(path: str) -> tuple[bool, str]:  # prefer the Conv/Linear producing the channels
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            return (True, path)
        return (not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)), path)

    for path in sorted(owners[group.index], key=readable):
        if not any(key_matches(path, g, owners[g.index]) for g in groups if g.index != group.index):
            return path
    return group.index


def sensitivity(
    model: nn.Module,
    example_input: Any,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
    *,
    importance: str | Criterion = "l2",
    data: Any = None,
    loss_fn: Any = None,
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    mode: str = "mask",
    higher_is_better: bool = True,
    metric_name: str = "metric",
    progress: bool = True,
) -> SensitivityTable:
    """Evaluate ``evaluate(pruned_model)`` with each prunable group pruned alone at each ratio.

    ``evaluate`` gets a model in eval mode (a copy; ``model`` is never modified) and returns a
    number (accuracy: ``higher_is_better=True``; loss: ``False``). ``importance`` picks which
    units go, exactly as in ``compact``.
    """
    from graphprune.planning.plan import build_plan

    if mode not in ("mask", "compact"):
        raise InputError(f"mode must be 'mask' or 'compact', got {mode!r}")
    ratios = [check_ratio(r) for r in ratios]
    if not ratios or any(r == 0 for r in ratios):
        raise InputError("ratios must be a non-empty list of fractions in (0, 1)")
    analysis, criterion = prepare(
        model,
        example_input,
        importance,
        ignored_layers,
        data=data,
        loss_fn=loss_fn,
        prune_hidden=prune_hidden,
        attention=attention,
    )
    groups = [g for g in analysis.groups if g.members and g.num_units > 1]
    work = copy.deepcopy(model).eval()
    baseline = float(evaluate(work))
    rows: list[SensitivityRow] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * len(ratios), desc="sensitivity", leave=False)
    params = dict(work.named_parameters(remove_duplicate=False))
    try:
        for g in groups:
            order = np.argsort(scores_for(criterion, g, analysis.model), kind="stable")
            row = SensitivityRow(g.index, g.describe(), g.num_units, _ratios_key(g, groups, analysis.model))
            saved = {
                m.name: param_tensor(work, m.name).detach().clone() for m in g.members if m.name in params
            }
            for r in ratios:
                n = min(int(round(r * g.num_units)), g.num_units - 1)
                if mode == "mask":
                    mask = np.zeros(g.num_units, dtype=bool)
                    mask[order[:n]] = True
                    zero_units(work, g, mask)
                    row.metric[r] = float(evaluate(work))
                    with torch.no_grad():
                        for name, t in saved.items():
                            param_tensor(work, name).copy_(t)
                else:
                    counts = {h.index: (n if h.index == g.index else 0) for h in groups}
                    plan = build_plan(analysis, r, criterion, importance_name(importance), counts=counts)
                    small = realize(analysis, plan, example_input, copy_model=True)[0].eval()
                    row.metric[r] = float(evaluate(small))
                if bar is not None:
                    bar.update(1)
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    return SensitivityTable(baseline, ratios, rows, higher_is_better, metric_name)
