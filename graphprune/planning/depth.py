"""Which blocks go: the count asked for, the scores, the choice (lower score = removed first).

* ``"weight"`` (default without data): the root-mean-square of the block's *output
  projections*, the parameters nearest to its residual adds (``o_proj`` and ``down_proj`` of a
  decoder layer, ``bn3`` of a bottleneck). A block whose output projections are all zero adds
  exactly nothing and scores 0, so it always goes first. Otherwise it is a weak proxy (it does
  not see how large the branch's input is); it is the default because it is deterministic, free
  and needs no data, like the width default (L2 magnitude).
* ``"cosine"`` (the default whenever ``data=`` is given): the block's measured effect, one
  minus the cosine similarity between the block's input and its output, per sample, averaged
  over the calibration batches (ShortGPT's "block influence"). A block that leaves its input
  unchanged in direction scores 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.errors import InputError
from graphprune.graph.blocks import Block
from graphprune.graph.trace import no_cache
from graphprune.planning.calibration import batches, forward, split_batch

SCORES = ("weight", "cosine")


def check_depth_value(depth: Any) -> None:
    """Refuse a bad ``depth`` before any tracing: a fraction in [0, 1) or a non-negative count."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        raise InputError(f"depth must be a fraction in [0, 1) or a number of blocks, got {depth!r}")
    if (isinstance(depth, int) and depth < 0) or (isinstance(depth, float) and not 0 <= depth < 1):
        raise InputError(f"depth must be a fraction in [0, 1) or a count >= 0, got {depth!r}; "
                         "pass an int for a number of blocks")


def check_depth(depth: Any, removable: int) -> int:
    """Number of blocks to remove: ``depth`` is a fraction in [0, 1) (rounded) or a count."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        raise InputError(f"depth must be a fraction in [0, 1) or a number of blocks, got {depth!r}")
    if isinstance(depth, int):
        if not 0 <= depth <= removable:
            raise InputError(f"depth={depth} blocks asked for but the model has {removable} removable "
                             "blocks (graphprune.find_blocks lists them and why others are not)")
        return depth
    if not 0 <= depth < 1:
        raise InputError(f"depth as a fraction must be in [0, 1), got {depth}; pass an int for a count")
    return int(round(depth * removable))


def weight_scores(blocks: list[Block], model: nn.Module) -> dict[int, float]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for b in blocks:
        ts = [tensors[n].detach().float() for n in b.outputs if n in tensors]
        total = sum(int(t.numel()) for t in ts)
        out[b.index] = math.sqrt(sum(float(t.pow(2).sum()) for t in ts) / total) if total else math.inf
    return out


def _first_tensor(obj: Any) -> torch.Tensor | None:
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def cosine_scores(blocks: list[Block], model: nn.Module, data: Any, max_batches: int | None = None
                  ) -> dict[int, float]:
    """1 - cos(block input, block output) per sample, averaged over ``data`` (see module docstring)."""
    sums = {b.index: 0.0 for b in blocks}
    counts = {b.index: 0 for b in blocks}
    handles = []

    def hook(index: int):
        def fn(_m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            x = _first_tensor((args, kwargs))
            y = _first_tensor(out)
            if x is None or y is None or x.shape != y.shape:
                return
            cos = nn.functional.cosine_similarity(x.flatten(1).double(), y.flatten(1).double(), dim=1)
            sums[index] += float((1 - cos).sum())
            counts[index] += int(cos.numel())
        return fn

    for b in blocks:
        handles.append(model.get_submodule(b.module).register_forward_hook(hook(b.index), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cache(model):
            for batch in batches(data, "depth scores", max_batches):
                forward(model, split_batch(batch)[0])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {i: sums[i] / counts[i] if counts[i] else math.inf for i in sums}


def block_scores(blocks: list[Block], model: nn.Module, importance: str | None, data: Any
                 ) -> dict[int, float]:
    kind = importance or ("cosine" if data is not None else "weight")
    if kind not in SCORES:
        raise InputError(f"depth_importance must be one of {SCORES}, got {kind!r}")
    if kind == "cosine":
        if data is None:
            raise InputError("depth_importance='cosine' measures blocks on data: pass data=<batches>")
        return cosine_scores(blocks, model, data)
    return weight_scores(blocks, model)


def choose(blocks: list[Block], scores: dict[int, float], count: int) -> list[Block]:
    """The ``count`` removable blocks with the lowest scores (ties: later blocks first)."""
    removable = [b for b in blocks if b.removable]
    if count == 0:
        return []
    ranked = sorted(removable, key=lambda b: (scores[b.index], -b.index))
    return sorted(ranked[:count], key=lambda b: b.index)
