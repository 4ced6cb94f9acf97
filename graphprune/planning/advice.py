"""What to tell a user whose plan removes nothing.

Why: a compact model as large as the original is returned without error (it is exact), yet the
user asked for a smaller one. The reasons are in ``plan.groups`` and ``print(plan)``, which most
users never print, so the call says it once, with the most frequent reasons and the option that
lifts the commonest one (``prune_hidden=True`` for channels a normalisation reduces over).
"""

from __future__ import annotations

import re
from collections import Counter

from graphprune.graph.analysis import Analysis
from graphprune.planning.plan import Plan

SHOWN = 3
# "mean.dim in model.layers.0.norm reduces over these channels" -> the reason without its place
_PLACE = re.compile(r" in [\w.\[\]]+(?=[: ]|$)")


def _general(reason: str) -> str:
    return _PLACE.sub("", reason).strip()


def nothing_removed(plan: Plan, analysis: Analysis, ratio: float, prune_hidden: bool) -> str | None:
    """The warning for a plan that removes no unit at ``ratio`` > 0; None when it removes some."""
    if ratio <= 0 or any(g.removed for g in plan.groups) or plan.depth:
        return None
    frozen = [g for g in plan.groups if g.reason]
    free = [g for g in plan.groups if not g.reason and g.units > 1]
    lines = [f"graphprune: nothing was removed at ratio={ratio:g}; the compact model is the original's size."]
    if frozen:
        common = Counter(_general(g.reason) for g in frozen).most_common(SHOWN)
        shown = "; ".join(f"{why} ({n} group{'s' if n > 1 else ''})" for why, n in common)
        lines.append(f"{len(frozen)} group(s) were kept whole, most often because: {shown}.")
    if free:
        lines.append(f"{len(free)} group(s) could be pruned, but the ratio removes less than one "
                     "of their units.")
    soft = {_general(r) for _, r in analysis.coupler.soft_frozen}
    if not prune_hidden and any(_general(g.reason) in soft for g in frozen):
        lines.append("Channels that a normalisation or statistic reduces over are kept unless you pass "
                     "prune_hidden=True (the norms then see fewer channels: not exact, fine-tune "
                     "after; docs/transformers.md).")
    lines.append("print(graphprune.make_plan(model, example_input, ratio)) lists every group and why.")
    return " ".join(lines)
