"""Target search (graphprune.search.targets): budgets met as measured independently, every candidate kept.

Oracles: the returned model's FLOPs and params are recounted with ``count_flops`` /
``count_params`` on the returned model itself (not taken from the search's own bookkeeping);
sweep rows are compared with ``graphprune.compact`` at the same ratio; speed results are checked
for consistency with their own measurements (timings are noisy, so no test asserts a speed-up).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphprune
from graphprune import zoo
from graphprune.planning.cut import round_keep
from graphprune.search.searcher import Ladder, allowed_kept
from graphprune.search.targets import best_round_to, compact_to_target, sweep


def _frac(kind: str, small: nn.Module, model: nn.Module, x) -> float:
    if kind == "flops":
        return graphprune.count_flops(small, x) / graphprune.count_flops(model, x)
    return graphprune.count_params(small) / graphprune.count_params(model)


class Wide(nn.Module):
    """An MLP with widths that are multiples of 8, big enough for latency to follow FLOPs."""

    def __init__(self, d_in: int = 64, hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize(
    ("name", "kind", "value"),
    [
        ("mlp", "flops", 0.5),
        ("resnet18", "flops", 0.4),
        ("mobilenetv2", "params", 0.6),
        ("mlp", "params", 0.3),
    ],
)
def test_flops_and_params_targets_are_met_within_two_percent(name, kind, value):
    model, x = zoo.build(name, "tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compact_to_target(model, x, **{f"target_{kind}": value})
    got = _frac(kind, result.model, model, x)
    assert result.met
    assert abs(got / value - 1) <= 0.02, (got, value)
    assert type(result.model) is type(model)
    chosen = [c for c in result.candidates if c.chosen]
    assert len(chosen) == 1
    assert abs((chosen[0].flops_frac if kind == "flops" else chosen[0].params_frac) - got) < 1e-9
    assert len(result.candidates) >= 2  # the search is reported, not only its answer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_compact_accepts_a_target_and_refuses_ambiguous_calls():
    model, x = zoo.build("mlp", "tiny")
    small = graphprune.compact(model, x, target_flops=0.5)
    assert abs(_frac("flops", small, model, x) / 0.5 - 1) <= 0.02
    small2, plan = graphprune.compact_with_plan(model, x, target_params=0.5)
    assert abs(_frac("params", small2, model, x) / 0.5 - 1) <= 0.02
    assert any("target params" in n for n in plan.notes)
    with pytest.raises(graphprune.InputError, match="either ratio or target_flops"):
        graphprune.compact(model, x, 0.3, target_flops=0.5)
    with pytest.raises(graphprune.InputError, match="one target at a time"):
        graphprune.compact(model, x, target_flops=0.5, target_params=0.5)
    with pytest.raises(graphprune.InputError, match="fraction of the original kept"):
        graphprune.compact(model, x, target_flops=50)
    with pytest.raises(graphprune.InputError, match=">= 1"):
        graphprune.compact(model, x, target_speedup=0.5)
    with pytest.raises(graphprune.InputError, match="global_pruning"):
        graphprune.compact(model, x, target_flops=0.5, global_pruning=True)


def test_unreachable_target_warns_and_returns_the_closest():
    model, x = zoo.build("vit_tiny", "tiny")  # hidden size is kept by default: FLOPs cannot fall to 5 %
    with pytest.warns(UserWarning, match="not met"):
        result = compact_to_target(model, x, target_flops=0.05)
    assert not result.met
    assert result.chosen.flops_frac == min(c.flops_frac for c in result.candidates)


def test_ladder_fractions_fall_monotonically_and_round_to_widths_hold():
    model, x = Wide(hidden=48), torch.randn(4, 64)
    an = graphprune.analyze(model, x)
    lad = Ladder(an, round_to=8)
    for g in an.groups:
        if g.num_units > 1 and g.members:
            kept = allowed_kept(g, 8)
            assert kept[0] == g.num_units and all(round_keep(g, k, 8) == k for k in kept[1:])
    steps = [0, len(lad) // 3, 2 * len(lad) // 3, len(lad)]
    removed = [sum(lad.counts(s).values()) for s in steps]
    assert removed == sorted(removed) and removed[-1] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compact_to_target(model, x, target_flops=0.5, round_to=8)
    for m in result.model.body:
        if isinstance(m, nn.Linear):
            assert m.out_features % 8 == 0, m
    assert all(c.round_to == 8 for c in result.candidates)


def test_sweep_params_fall_with_the_ratio_and_match_compact():
    model, x = zoo.build("resnet18", "tiny")
    ratios = [0.0, 0.2, 0.4, 0.6]
    rows = sweep(model, x, ratios, latency=False)
    assert [r["ratio"] for r in rows] == ratios
    params = [r["params"] for r in rows]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert rows[0]["params"] == graphprune.count_params(model)
    small = graphprune.compact(model, x, 0.4, verify=False)
    assert rows[2]["params"] == graphprune.count_params(small)
    assert rows[2]["flops"] == graphprune.count_flops(small, x)
    assert rows[2]["latency_ms"] is None


def test_sweep_with_latency_times_each_ratio_against_the_original():
    model, x = Wide(), torch.randn(32, 64)
    seen = []
    rows = sweep(model, x, [0.0, 0.5], runs=3, warmup=1, callback=seen.append)
    assert seen == rows
    for r in rows:
        assert r["latency_ms"] > 0 and r["baseline_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["latency_ms"])
        assert r["p10_ms"] <= r["latency_ms"] <= r["p90_ms"]
    assert rows[1]["ideal_speedup"] > 1.5


def test_speedup_target_returns_measured_candidates_consistently():
    model, x = Wide(), torch.randn(32, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not met" is possible on a noisy machine
        result = compact_to_target(model, x, target_speedup=1.3, runs=5, warmup=2, max_candidates=4)
    assert 1 <= len(result.candidates) <= 4
    assert all(c.latency_ms and c.baseline_ms and c.exporter for c in result.candidates)
    meeting = [c for c in result.candidates if c.speedup >= 1.3]
    assert result.met == bool(meeting)
    if meeting:  # least pruned among those that meet the target
        assert result.chosen.ratio == min(c.ratio for c in meeting)
    assert "candidates tried" in str(result)
    assert graphprune.count_params(result.model) == result.chosen.params


def test_generous_latency_target_needs_no_pruning():
    model, x = Wide(hidden=64), torch.randn(4, 64)
    result = compact_to_target(model, x, target_latency_ms=1e4, runs=3, warmup=1)
    assert result.met and result.chosen.ratio == 0.0
    assert graphprune.count_params(result.model) == graphprune.count_params(model)


def test_best_round_to_times_each_choice():
    model, x = Wide(hidden=64), torch.randn(8, 64)
    best, cands = best_round_to(model, x, 0.4, choices=(1, 8), runs=3, warmup=1)
    assert best in (1, 8) and [c.round_to for c in cands] == [1, 8]
    assert sum(c.chosen for c in cands) == 1 and all(c.latency_ms for c in cands)
