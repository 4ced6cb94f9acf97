"""The engine: one analysis, any number of plans and realisations, nothing of the caller's changed.

Oracles: ``compact`` at the same ratio (an independent one-shot path through the same stages),
the masked reference (``engine.verify``), and snapshots of the user's model and of the plans.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import assert_untouched, snapshot

import graphprune
import graphprune.engine as engine_module
from graphprune import zoo
from graphprune.engine import Engine
from graphprune.errors import GraphPruneError, InputError
from graphprune.planning.options import CutOptions, StructureOptions


@pytest.fixture(scope="module")
def mlp():
    return zoo.build("mlp")


def test_one_analysis_serves_many_plans_and_matches_compact(mlp, monkeypatch) -> None:
    model, x = mlp
    before = snapshot(model)
    calls = []
    real = engine_module.analyze
    monkeypatch.setattr(engine_module, "analyze", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(model, x)
    results = {}
    for r in (0.3, 0.6):
        plan = engine.plan(r)
        kept = copy.deepcopy(plan.to_dict())
        result = engine.realize(plan)
        assert plan.to_dict() == kept, "realize changed the caller's plan"
        assert result.plan is not plan and result.plan.attr_updates
        engine.verify(result)
        results[r] = result
    assert len(calls) == 1, "the engine analysed more than once"
    assert graphprune.count_params(results[0.6].model) < graphprune.count_params(results[0.3].model)
    small = graphprune.compact(model, x, ratio=0.3)
    got, want = results[0.3].model.state_dict(), small.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert_untouched(model, before)


def test_last_realisation_spends_the_engine(mlp) -> None:
    model, x = mlp
    engine = Engine(model, x)
    engine.realize(engine.plan(0.3), last=True)
    with pytest.raises(GraphPruneError, match="new Engine"):
        engine.realize(engine.plan(0.3))


def test_options_are_validated_where_built() -> None:
    with pytest.raises(InputError, match="attention"):
        StructureOptions(attention="rows")
    with pytest.raises(InputError, match="round_to"):
        CutOptions(round_to=0)
    with pytest.raises(InputError, match="max_ratio"):
        CutOptions(global_pruning=True, max_ratio=1.5)
    with pytest.raises(AttributeError):
        CutOptions().round_to = 8  # type: ignore[misc]  # frozen
