"""Block sensitivity: remove each removable block alone and measure a metric you choose.

The depth counterpart of :func:`graphprune.sensitivity`: one row per block that
``graphprune.find_blocks`` offers, with the metric after removing that block alone (everything
else intact) and its default weight score, so a user can see which blocks the cheap score gets
wrong before trusting it. Each row is a real removal (``graphprune.surgery.depth.remove``) on a
copy of the traced model, not a mask, so what is measured is what ``compact(depth=...)`` returns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from graphprune.planning.depth import weight_scores
from graphprune.surgery.depth import DepthEntry, remove


@dataclass
class BlockRow:
    module: str
    params: int  # parameter elements the removal deletes
    weight_score: float  # the default score (RMS of the output projections)
    metric: float  # the metric with this block removed alone


def rows_for(model: nn.Module, example_input: Any, evaluate: Callable[[nn.Module], float], *,
             unit: str = "module", ignored_layers: Any = (), progress: bool = True) -> list[BlockRow]:
    """Evaluate the model with each removable block removed alone (``model`` is not modified)."""
    from graphprune.depth import find

    work, _, blocks = find(model, example_input, ignored_layers, unit)
    offered = [b for b in blocks if b.removable]
    scores = weight_scores(offered, work)
    sizes = {k: v.numel() for k, v in work.named_parameters()}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(offered), desc="block sensitivity", leave=False)
    rows = []
    try:
        for b in offered:
            trial = copy.deepcopy(work)
            entry = DepthEntry(b.module, type(work.get_submodule(b.module)).__name__, b.container,
                               b.position, list(b.tail), scores[b.index], 0, b.zero, list(b.skipped))
            remove(trial, [entry])
            rows.append(BlockRow(b.module, sum(sizes.get(p, 0) for p in b.params), scores[b.index],
                                 float(evaluate(trial.eval()))))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def blocks_markdown(rows: list[BlockRow], baseline: float, metric_name: str) -> str:
    lines = [f"| block | params | weight score | {metric_name} (baseline {baseline:.4g}) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r.module} | {r.params} | {r.weight_score:.3g} | {r.metric:.4g} |" for r in rows]
    return "\n".join(lines)
