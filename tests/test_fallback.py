"""When the user's class cannot run at the new widths: fallback="freeze" | "graph" | "error".

The model is timm's hard case in miniature: attention merges its heads back with
``reshape(B, N, C)``, ``C`` read off the *input*, so after head pruning no attribute can make the
class run. The default keeps every module of that class whole and prunes the rest (the user's
class comes back); since the rewrite (docs/rewrite.md, tests/test_rewrite.py) the default first
rewrites only those modules as graphs and "whole" is the keep-whole answer these tests check;
"graph" prunes everything into an fx GraphModule; "error" raises.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import (
    assert_same_outputs,
    assert_untouched,
    check_dead_channels,
    check_ratio_zero_identity,
    make_dead,
    snapshot,
)
from torch import nn

import graphprune
from graphprune.errors import GraphPruneError, InputError

DIM, HEADS, HIDDEN, RATIO = 24, 4, 32, 0.5  # head_dim 6: no ambiguity with num_heads


class TimmAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, DIM // HEADS
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, C))  # C: the input's width


class Block(nn.Module):
    def __init__(self, attn_name: str = "attn") -> None:
        super().__init__()
        self.attn_name = attn_name
        self.norm = nn.LayerNorm(DIM)
        setattr(self, attn_name, TimmAttention())  # names differ per block: the rule is the class
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + getattr(self, self.attn_name)(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.blocks = nn.Sequential(Block("attn"), Block("mixer"))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


ATTN = ["blocks.0.attn", "blocks.1.mixer"]


def _net() -> tuple[Net, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net().eval(), torch.randn(2, 5, 8)


def _batch5(x: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torch.randn(5, *x.shape[1:])


def _compact(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, plan = graphprune.compact_with_plan(model, x, RATIO, **kw)
    return small, plan, [str(w.message) for w in caught if str(w.message).startswith("graphprune")]


def test_default_rewrites_only_the_attention_and_returns_the_users_class() -> None:
    model, x = _net()
    small, plan, msgs = _compact(model, x)
    assert type(small) is Net and list(small.state_dict()) == list(model.state_dict())
    for blk, name in zip(small.blocks, ["attn", "mixer"], strict=True):
        assert getattr(blk, name).get_parameter("qkv.weight").shape[0] == 3 * DIM // 2, "heads pruned"
    assert len(msgs) == 1 and "rewritten as graphs" in msgs[0] and all(p in msgs[0] for p in ATTN), msgs
    assert [r["module"] for r in plan.rewrites] == ATTN
    for batch in (x, _batch5(x)):
        assert small(batch).shape == model(batch).shape


def test_whole_keeps_the_attention_class_whole_and_returns_the_users_class() -> None:
    model, x = _net()
    small, plan, msgs = _compact(model, x, fallback="whole")
    assert type(small) is Net
    for blk, name in zip(small.blocks, ["attn", "mixer"], strict=True):
        attn = getattr(blk, name)
        assert attn.qkv.out_features == 3 * DIM and attn.num_heads == HEADS, "attention kept whole"
        assert blk.fc1.out_features == HIDDEN // 2, "the MLP is still pruned"
    assert graphprune.count_params(small) < graphprune.count_params(model)
    assert len(msgs) == 1 and all(p in msgs[0] for p in ATTN), msgs
    assert "TimmAttention" in msgs[0] and f"shape '[2, 5, {DIM}]' is invalid" in msgs[0]
    assert "reshape(B, N, -1)" in msgs[0], "the warning says how to get it pruned"
    assert any("kept whole" in n and "TimmAttention" in n for n in plan.notes), plan.notes
    for batch in (x, _batch5(x)):  # the user's class runs at any batch
        assert small(batch).shape == model(batch).shape


def _heads_first(group, model) -> torch.Tensor:
    """Heads score 0, everything else 1..n: global ranking then takes heads first."""
    if any(m.name.endswith("qkv.weight") and m.dim == 0 for m in group.members):
        return torch.zeros(group.num_units)
    return torch.arange(1.0, group.num_units + 1)


@pytest.mark.parametrize(
    "kw", [{}, {"round_to": 4}, {"global_pruning": True, "importance": _heads_first}],
    ids=["uniform", "round_to", "global"],
)
def test_freeze_is_the_plan_made_with_those_modules_in_ignored_layers(kw) -> None:
    """The re-plan uses the same options: with global ranking the heads' share moves to the MLPs."""
    model, x = _net()
    _, plan, msgs = _compact(model, x, fallback="whole", **kw)
    assert len(msgs) == 1 and "kept whole" in msgs[0], msgs
    _, explicit, msgs = _compact(model, x, ignored_layers=ATTN, **kw)
    assert not msgs, msgs
    assert plan.slices == explicit.slices
    assert plan.slices and not any("attn" in k or "mixer" in k for k in plan.slices)


def test_ratio_zero_identity_and_dead_units_removed_leave_outputs_unchanged() -> None:
    model, x = _net()
    check_ratio_zero_identity(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = check_dead_channels(model, x, RATIO)  # compares with the dead model on x
        dead = make_dead(model, x, RATIO)
    assert type(small) is Net
    assert_same_outputs(small, dead.model, _batch5(x), rtol=1e-5, what="batch 5 vs the dead model")


def test_error_names_the_module_and_the_fix() -> None:
    model, x = _net()
    with pytest.raises(GraphPruneError, match=r"TimmAttention 'blocks\.0\.attn'") as err:
        graphprune.compact(model, x, RATIO, fallback="error")
    assert "reshape(B, N, -1)" in str(err.value) and "blocks.1.mixer" in str(err.value)
    with pytest.raises(GraphPruneError, match="blocks.0.attn"):
        graphprune.make_plan(model, x, RATIO, fallback="error")


def test_graph_prunes_everything_and_runs_at_other_batch_sizes() -> None:
    model, x = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dead = make_dead(model, x, RATIO)
    small, plan, msgs = _compact(dead.model, x, importance=dead.importance, fallback="graph")
    assert isinstance(small, torch.fx.GraphModule)
    assert any("GraphModule" in m and "any batch size" in m for m in msgs), msgs
    assert small.get_parameter("blocks.0.attn.qkv.weight").shape[0] == 3 * DIM // 2, "heads pruned"
    for batch in (x, x[:1], _batch5(x), torch.cat([x, x, x])):
        assert_same_outputs(small, dead.model, batch, rtol=1e-5, what=f"batch {batch.shape[0]}")


def test_graph_at_batch_one_stays_static_and_says_so() -> None:
    model, x = _net()
    small, _, msgs = _compact(model, x[:1], fallback="graph")
    assert isinstance(small, torch.fx.GraphModule)
    assert any("only accepts the example's batch size (1)" in m for m in msgs), msgs


def test_make_plan_replays_into_a_running_users_class() -> None:
    model, x = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = graphprune.make_plan(model, x, RATIO)
    small = graphprune.apply_plan(model, plan)
    assert type(small) is Net and small(_batch5(x)).shape == (5, 3)


def test_target_search_returns_the_users_class() -> None:
    model, x = _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = graphprune.compact(model, x, target_params=0.9)
    assert type(small) is Net
    assert any("rewritten as graphs" in str(w.message) for w in caught)
    assert small(_batch5(x)).shape == (5, 3)
    assert graphprune.count_params(small) < graphprune.count_params(model)


@pytest.mark.parametrize("bad", ["Graph", "none", None, 1])
def test_unknown_fallback_is_refused(bad) -> None:
    model, x = _net()
    for call in (
        lambda: graphprune.compact(model, x, RATIO, fallback=bad),
        lambda: graphprune.compact_with_plan(model, x, RATIO, fallback=bad),
        lambda: graphprune.make_plan(model, x, RATIO, fallback=bad),
        lambda: graphprune.compact(model, x, target_params=0.8, fallback=bad),
    ):
        with pytest.raises(InputError, match="fallback must be one of"):
            call()


def test_the_users_model_is_bit_identical_after_every_mode() -> None:
    model, x = _net()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fb in ("freeze", "whole", "graph"):
            graphprune.compact(model, x, RATIO, fallback=fb)
        with pytest.raises(GraphPruneError):
            graphprune.compact(model, x, RATIO, fallback="error")
    assert_untouched(model, before)
