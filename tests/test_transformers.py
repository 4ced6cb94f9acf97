"""compact() on transformer and recurrent building blocks written by hand (tests/transformer_models.py).

Each model writes attention, grouped-query attention, gated MLPs, norms, tied embeddings or
recurrent layers in one of the ways people write them outside Hugging Face. Generic oracles
(``oracles.OracleSuite``: ratio 0 identical, exactly dead units removed without changing the
outputs, onnxruntime agrees, input model untouched) run on every model; the structural tests
check what the engine must see: whole heads, q/kv ratios, gates sharing units,
nn.MultiheadAttention's single width, ties.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformer_models as tm
from oracles import OracleSuite, assert_same_outputs, check_onnx, compacted
from torch import nn

import graphprune

MODELS = list(tm.BUILDERS)
RATIO = 0.3
# timm's ``reshape(B, N, C)`` reads C (the hidden size) off the input: no attribute can make the
# class run with fewer heads, so graphprune rewrites that attention as a graph (docs/rewrite.md),
# or with fallback="whole" keeps it whole (with a warning either way).
FROZEN_ATTENTION = {"timm_attention_merge_C"}


def _compacted(name: str) -> tuple[nn.Module, Any, nn.Module]:
    """(model, input, compact model), compacted once per session for the suite and the tests below."""
    c = compacted(tm.build, name, RATIO)
    return c.model, c.example_input, c.small


@pytest.mark.parametrize("name", MODELS)
class TestGenericOracles(OracleSuite):
    build = tm.build
    ratio = RATIO
    flops = False

    def test_compact_model_is_the_users_class(self, name: str) -> None:
        super().test_compact_model_is_the_users_class(name)
        c = self.compacted(name)  # and only timm's merge needs modules rewritten
        assert any("rewritten as graphs" in m for m in c.warnings) == (name in FROZEN_ATTENTION), c.warnings


# ------------------------------------------------------------------------------------------
# What the engine must see in each way of writing a transformer
# ------------------------------------------------------------------------------------------


def test_hand_written_attention_loses_whole_heads_and_its_attributes_follow() -> None:
    model, x, small = _compacted("hand_attention")
    attn = small.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (3, 8), "one of 4 heads of width 8 should go"
    assert attn.qkv.out_features == 3 * 3 * 8 and attn.proj.in_features == 3 * 8
    x3 = torch.cat([x, x[:1]])  # the user's class runs at another batch size
    assert small(x3).shape == model(x3).shape


def test_timm_style_merge_rewrites_its_attention_or_keeps_it_whole_on_request() -> None:
    model, x = tm.build("timm_attention_merge_C")
    with pytest.warns(UserWarning, match="rewritten as graphs"):
        small = graphprune.compact(model, x, ratio=RATIO)
    assert type(small) is type(model) and list(small.state_dict()) == list(model.state_dict())
    assert any(blk.attn.num_heads < old.attn.num_heads for blk, old in zip(small.blocks, model.blocks))
    with pytest.warns(UserWarning, match="kept whole"):
        small = graphprune.compact(model, x, ratio=RATIO, fallback="whole")
    assert type(small) is type(model)
    for blk, old in zip(small.blocks, model.blocks, strict=True):
        assert blk.attn.num_heads == old.attn.num_heads, "the attention class is kept whole"
    assert graphprune.count_params(small) < graphprune.count_params(model)
    x3 = torch.cat([x, x[:1]])  # the user's class runs at another batch size
    assert small(x3).shape == model(x3).shape


def test_sdpa_attention_with_minus_one_head_split_gets_num_heads_updated() -> None:
    """``view(B, N, -1, head_dim)`` holds no head count: it comes from the SDPA operands."""
    _, _, small = _compacted("sdpa")
    for blk in small.blocks:
        assert blk.attn.num_heads == 3 and blk.attn.q.out_features == 24


@pytest.mark.parametrize("name", ["gqa_repeat_interleave", "gqa_expand", "gqa_enable_gqa"])
def test_grouped_query_attention_keeps_the_q_per_kv_ratio(name: str) -> None:
    model, x, small = _compacted(name)
    attn, old = small.blocks[0].attn, model.blocks[0].attn
    assert attn.num_kv_heads == 1 and attn.num_heads == 2, "one whole kv group (1 kv + 2 q heads) goes"
    assert attn.num_heads * old.num_kv_heads == old.num_heads * attn.num_kv_heads
    assert attn.k_proj.out_features == attn.num_kv_heads * attn.head_dim
    assert attn.q_proj.out_features == attn.num_heads * attn.head_dim


def test_swiglu_gate_and_up_lose_the_same_units() -> None:
    model, x = tm.build("gqa_expand")
    plan = graphprune.make_plan(model, x, ratio=RATIO)
    mlp = "blocks.0.mlp."
    gate, up = plan.slices[mlp + "gate.weight"][0], plan.slices[mlp + "up.weight"][0]
    assert gate == up and len(gate) == 45
    assert plan.slices[mlp + "down.weight"][1] == gate


def test_hidden_size_is_opt_in_and_rmsnorm_follows_it() -> None:
    model, x = tm.build("gqa_expand")
    analysis = graphprune.analyze(model, x)
    hidden = [g for g in analysis.groups if any(m.name == "norm.weight" for m in g.members)]
    assert hidden and all(not g.prunable for g in hidden)
    assert any("reduces over these channels" in (g.reason or "") for g in hidden)
    small = graphprune.compact(model, x, ratio=RATIO, prune_hidden=True)
    assert small.norm.weight.shape[0] < model.norm.weight.shape[0]
    assert small.embed.out_features == small.norm.weight.shape[0] == small.head.in_features


def test_tied_embeddings_stay_tied_when_the_hidden_size_shrinks() -> None:
    model, x = tm.build("tiny_lm_tied")
    small = graphprune.compact(model, x, ratio=RATIO, prune_hidden=True)
    assert small.lm_head.weight is small.embed.weight
    assert small.embed.weight.shape == (tm.VOCAB, 22)
    assert small(x).shape == model(x).shape


@pytest.mark.parametrize("name", ["mha_batch_first", "mha_seq_first"])
def test_multihead_attention_heads_go_only_with_the_hidden_size(name: str) -> None:
    """nn.MultiheadAttention has one width (``embed_dim``) for its input, heads and output."""
    model, x, small = _compacted(name)
    assert small.attn.embed_dim == model.attn.embed_dim, "heads must stay while the hidden size does"
    assert small.mlp[0].out_features < model.mlp[0].out_features
    small = graphprune.compact(model, x, ratio=RATIO, prune_hidden=True)
    attn = small.attn
    assert attn.num_heads == 3 and attn.embed_dim == attn.kdim == attn.vdim == 24
    assert attn.head_dim == 8 and attn.in_proj_weight.shape == (72, 24)
    assert small(x).shape == model(x).shape
    check_onnx(small, x)


def test_cross_attention_heads_follow_the_query_projection_and_kdim_vdim_shrink() -> None:
    model, x, small = _compacted("mha_cross_kdim_vdim")
    attn = small.attn
    assert (attn.num_heads, attn.embed_dim, attn.head_dim) == (3, 24, 8)
    assert (attn.kdim, attn.vdim) == (11, 14) and not attn._qkv_same_embed_dim
    assert small.q_in.out_features == 24 and small.k_in.out_features == 11


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm_2layer_bidirectional"])
def test_recurrent_hidden_units_go_gate_by_gate_in_every_layer(name: str) -> None:
    model, x, small = _compacted(name)
    rnn, gates = small.rnn, 4 if isinstance(small.rnn, nn.LSTM) else 3
    assert rnn.hidden_size == 17  # round(0.3 * 24) = 7 units removed
    for pname, p in rnn.named_parameters():
        assert p.shape[0] == gates * 17, pname
        if "weight_hh" in pname:
            assert p.shape[1] == 17
    x3 = torch.cat([x, x[:1]])
    assert small(x3).shape == model(x3).shape


def test_lstm_with_projections_is_frozen_with_a_reason() -> None:
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(12, 24, proj_size=8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model, x = Proj().eval(), torch.randn(2, tm.SEQ, 12)
    analysis = graphprune.analyze(model, x)
    frozen = [g for g in analysis.groups if any(m.name.startswith("rnn.") for m in g.members)]
    assert frozen and all(not g.prunable for g in frozen)
    assert any("proj_size" in (g.reason or "") for g in frozen)
    assert_same_outputs(graphprune.compact(model, x, ratio=RATIO), model, x, rtol=0.0)
