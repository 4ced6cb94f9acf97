"""The plan: which positions of which tensors go, and which groups stay whole and why.

A plan is plain data (JSON-serialisable) so it can be printed, reviewed, saved next to the
weights and replayed on a freshly built base model without tracing it again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import InputError, PlanMismatchError
from graphprune.graph.analysis import Analysis
from graphprune.planning.cut import CutOptions, choose_removed
from graphprune.planning.importance import Criterion, scores_for
from graphprune.planning.plan_json import PLAN_FORMAT, check_dict, parse_text


@dataclass
class GroupPlan:
    index: int
    layers: str  # modules touched, for humans
    units: int
    removed: list[int]
    frozen_units: int = 0
    reason: str | None = None


@dataclass
class AttrUpdate:
    module: str
    attr: str
    old: Any
    new: Any


@dataclass
class Plan:
    """Kept indices per tensor dimension plus the attribute changes that go with them."""

    ratio: float
    importance: str
    slices: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # name -> dim -> kept
    shapes: dict[str, list[int]] = field(default_factory=dict)  # original shapes of sliced tensors
    groups: list[GroupPlan] = field(default_factory=list)
    attr_updates: list[AttrUpdate] = field(default_factory=list)
    boundaries: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    structure: dict[str, Any] = field(default_factory=dict)  # analysis options: prune_hidden, attention
    # multiply before slicing: {"tensor", "dim", "index", "factor"} (q rows when SDPA's default
    # scale follows a pruned head size, see rules.attention._fold_scale_into_q)
    scales: list[dict[str, Any]] = field(default_factory=list)
    # blocks removed before the width slices (graphprune.depth.DepthEntry as dicts), in order
    depth: list[dict[str, Any]] = field(default_factory=list)
    # modules given a zero bias before slicing (reconstruction's bias compensation needed one)
    biases: list[str] = field(default_factory=list)
    # submodules replaced by a graph of their own (surgery.rewrite): module, export inputs, constants
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    # bool per unit class, removed or not: what surgery sizes from; derived data, not saved
    removed_class: np.ndarray | None = field(default=None, repr=False, compare=False)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("removed_class")
        d["slices"] = {k: {str(dim): v for dim, v in dims.items()} for k, dims in self.slices.items()}
        d["format"] = PLAN_FORMAT
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "plan") -> Plan:
        """A plan from ``to_dict``'s output; anything else is a PlanMismatchError naming the field."""
        c = check_dict(d, where)
        return cls(
            ratio=c["ratio"],
            importance=c["importance"],
            slices=c["slices"],
            shapes=c["shapes"],
            groups=[GroupPlan(**g) for g in c["groups"]],
            attr_updates=[AttrUpdate(**a) for a in c["attr_updates"]],
            boundaries=c["boundaries"],
            notes=c["notes"],
            structure=c["structure"],
            scales=c["scales"],
            depth=c["depth"],
            biases=c["biases"],
            rewrites=c["rewrites"],
        )

    @classmethod
    def from_text(cls, text: str, where: str = "plan") -> Plan:
        """A plan from JSON text (never taken for a file name, whatever it holds)."""
        return cls.from_dict(parse_text(text, where), where)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """A plan from JSON text, or from the file at a path (a ``Path``, or a string that is not JSON).

        A file's contents are parsed as JSON only: a file holding a path is an error, not a redirect.
        """
        if isinstance(text_or_path, Path):
            return cls.from_text(_read(text_or_path), str(text_or_path))
        if not isinstance(text_or_path, str):
            raise PlanMismatchError(f"a plan is JSON text or a path, got {type(text_or_path).__name__}")
        if text_or_path.lstrip()[:1] in ("{", "[", '"') or "\n" in text_or_path:
            return cls.from_text(text_or_path)
        path = Path(text_or_path)
        if not path.is_file():
            raise PlanMismatchError(f"{text_or_path!r:.120} is neither plan JSON nor an existing file")
        return cls.from_text(_read(path), str(path))

    # -- display ------------------------------------------------------------------------------
    def summary(self, max_groups: int = 40) -> str:
        pruned = [g for g in self.groups if g.removed]
        frozen = [g for g in self.groups if not g.removed and g.reason]
        lines = [
            f"graphprune plan: ratio={self.ratio} importance={self.importance}",
            f"  {len(pruned)} groups pruned, {len(frozen)} kept whole, {len(self.slices)} tensors sliced",
        ]
        for g in pruned[:max_groups]:
            lines.append(
                f"  group {g.index:>3}: {g.units - len(g.removed):>5}/{g.units:<5} units kept  {g.layers}"
            )
        if len(pruned) > max_groups:
            lines.append(f"  ... {len(pruned) - max_groups} more pruned groups")
        if frozen:
            lines.append("  kept whole:")
            for g in frozen[:max_groups]:
                lines.append(f"  group {g.index:>3}: {g.layers}: {g.reason}")
        if self.boundaries:
            lines.append("  boundaries (ops without a rule; channels through them are frozen):")
            lines.extend(f"    {b}" for b in self.boundaries[:20])
        if self.scales:
            scaled = sorted({e["tensor"] for e in self.scales})
            lines.append(
                f"  rescaled (SDPA's default scale follows the pruned head size): {', '.join(scaled[:6])}"
                + (f" +{len(scaled) - 6} more" if len(scaled) > 6 else "")
            )
        if self.depth:
            lines.append(f"  {len(self.depth)} blocks removed (before the width cut):")
            for e in self.depth:
                how = e.get("action", "removed")
                score = "" if e.get("score") is None else f" score {e['score']:.3g}"
                lines.append(f"    {e['module']} ({e['cls']}, {e.get('params', 0)} params){score}: {how}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanMismatchError(f"cannot read the plan file {path}: {exc}") from exc


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= float(ratio) < 1:
        raise InputError(
            f"ratio must be a number in [0, 1): the fraction of units removed from each group "
            f"(like torch.nn.utils.prune's amount); got {ratio!r}. Use e.g. ratio=0.3."
        )
    return float(ratio)


def build_plan(
    analysis: Analysis,
    ratio: float,
    criterion: Criterion,
    importance_name: str,
    *,
    counts: dict[int, int] | None = None,
    options: CutOptions | None = None,
) -> Plan:
    """Score every prunable group and remove ``round(ratio * units)`` of its units (keep >= 1).

    ``counts`` (group index -> units to remove) overrides the ratio for the groups it names: the
    target search (``graphprune.search.targets``) uses it to step one group at a time between ratios.
    A criterion with an ``exact_counts(analysis)`` method (``importance="mask"``) supplies them itself.
    ``options`` selects global ranking, per-module ratios and ``round_to`` (``graphprune.planning.cut``).
    """
    ratio = check_ratio(ratio)
    n_cls = len(analysis.frozen_class)
    removed_class = np.zeros(n_cls, dtype=bool)
    unit_to_class: dict[tuple[int, int], int] = {v: c for c, v in analysis.class_unit.items()}
    plan = Plan(
        ratio=ratio,
        importance=importance_name,
        boundaries=list(analysis.boundaries),
        structure=dict(analysis.options),
    )
    opts = options or CutOptions()
    exact = getattr(criterion, "exact_counts", None)  # a criterion that decides how many go too
    if callable(exact):
        counts = {**exact(analysis), **(counts or {})}
    if counts is not None:
        opts = dataclasses.replace(opts, counts={**(opts.counts or {}), **counts})
    chosen, cut_notes = choose_removed(analysis, ratio, criterion, opts, scores_for)
    plan.notes.extend(cut_notes)
    for g in analysis.groups:
        if not g.members:
            continue
        removed = chosen.get(g.index, [])
        for u in removed:
            removed_class[unit_to_class[(g.index, u)]] = True
        plan.groups.append(GroupPlan(g.index, g.describe(), g.num_units, removed, g.frozen_units, g.reason))
    plan.slices = slices_of(analysis, removed_class)
    plan.scales = scale_entries(analysis, removed_class)
    plan.removed_class = removed_class
    return plan


def slices_of(analysis: Analysis, removed_class: np.ndarray) -> dict[str, dict[int, list[int]]]:
    """Kept indices per parameter dimension when the unit classes in ``removed_class`` go.

    Equal lists are one list (the tensors of a group keep the same positions): surgery turns
    each list into an index tensor once (``slicing.slice_tensors``). Nothing modifies them."""
    slices: dict[str, dict[int, list[int]]] = {}
    lists: dict[bytes, list[int]] = {}
    cls = analysis.unit_class
    for (name, dim), ids in analysis.coupler.param_ids.items():
        drop = removed_class[cls[ids]]
        if drop.any():
            key = drop.tobytes()
            kept = lists.get(key)
            if kept is None:
                kept = lists[key] = np.flatnonzero(~drop).tolist()
            slices.setdefault(name, {})[dim] = kept
    return slices


def scale_entries(analysis: Analysis, removed_class: np.ndarray) -> list[dict[str, Any]]:
    """q rows to multiply by sqrt(E'/E) where SDPA's default scale follows a pruned head size."""
    out: list[dict[str, Any]] = []
    cls = analysis.unit_class
    for rec in analysis.coupler.rescales:
        keep = np.where(rec.ids >= 0, ~removed_class[cls[np.maximum(rec.ids, 0)]], True)
        kept = np.moveaxis(keep, rec.axis, 0).reshape(rec.ids.shape[rec.axis], -1).any(axis=1)
        if 0 < kept.sum() < kept.size:
            factor = float(np.sqrt(kept.sum() / kept.size))
            for name in (rec.weight, rec.bias):
                if name is not None:
                    out.append({"tensor": name, "dim": 0, "index": rec.rows.tolist(), "factor": factor})
    return out
