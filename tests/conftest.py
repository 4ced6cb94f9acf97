"""Shared pytest set-up: importable oracles, deterministic torch, one compaction per model.

Compacting (tracing with torch.export, planning, surgery, verification) is the slow part of
every test; several oracles look at the same compact model, so ``compacted`` runs
``graphprune.compact`` once per (model, ratio) per session and hands out the cached result,
together with a snapshot of the input model taken *before* compaction.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # `import oracles` under any pytest import mode

import oracles  # noqa: E402

from graphprune import zoo  # noqa: E402

# The test models are tiny: intra-op threads cannot speed them up, and on a busy 2-core machine
# they slow every conv down 10-100x (measured: a tiny MobileNetV2 forward takes 2.5 ms on one
# thread, 1 s on two while another process keeps the cores busy).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Same random numbers in every test, whatever ran before it."""
    torch.manual_seed(0)


@dataclass
class Compacted:
    """A zoo model, its example input, a snapshot taken before compaction, and the result."""

    name: str
    ratio: float
    model: nn.Module
    example_input: Any
    before: oracles.Snapshot
    small: nn.Module


@pytest.fixture(scope="session")
def compacted() -> Callable[[str, float], Compacted]:
    """``compacted(name, ratio)``: the zoo model ``name`` (tiny) compacted once per session.

    A failure is cached too and re-raised for every test that asks, so a broken model costs one
    compaction, not one per oracle.
    """
    import graphprune

    cache: dict[tuple[str, float], Compacted | BaseException] = {}

    def get(name: str, ratio: float) -> Compacted:
        key = (name, ratio)
        if key not in cache:
            model, x = zoo.build(name, "tiny")
            before = oracles.snapshot(model)
            try:
                small = graphprune.compact(model, x, ratio=ratio)
                cache[key] = Compacted(name, ratio, model, x, before, small)
            except Exception as e:  # noqa: BLE001 - re-raised below, for every test that asks
                cache[key] = e
        hit = cache[key]
        if isinstance(hit, BaseException):
            raise hit
        return hit

    return get
