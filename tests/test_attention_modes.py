"""``attention=`` modes: whole heads, q heads within kv groups, channels inside every head.

Each mode changes what a *unit* is, so each is checked with the oracles under that mode: ratio 0
is the identity, removing exactly-dead units (made dead under the same mode's grouping) leaves
the outputs unchanged, and the compact model is the user's class with attributes that describe
it. Plus the structure each mode promises: "q_heads" never touches a kv projection, "head_dim"
never changes a head count, multi-query attention loses q heads by default.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from oracles import assert_same_outputs, check_dead_channels, check_input_untouched, check_onnx
from transformer_models import GQAAttention, SdpaAttention, _encoder, _features, _randomize, build

import graphprune
from graphprune.errors import InputError, VerificationError


def _attn(model: torch.nn.Module) -> torch.nn.Module:
    return model.blocks[0].attn


def _identity(model, x, mode: str) -> None:
    small = graphprune.compact(model, x, 0.0, attention=mode)
    assert_same_outputs(small, model, x, rtol=0.0, what=f"compact(ratio=0, attention={mode!r})")


def test_unknown_mode_is_refused_with_the_choices() -> None:
    model, x = build("hand_attention")
    with pytest.raises(InputError, match="head_dim"):
        graphprune.compact(model, x, 0.3, attention="channels")


@pytest.mark.parametrize("name", ["hand_attention", "hand_attention_merge_minus1"])
def test_head_dim_prunes_inside_every_head(name: str) -> None:
    model, x = build(name)
    _identity(model, x, "head_dim")
    small = check_dead_channels(model, x, 0.5, attention="head_dim")
    attn, before = _attn(small), _attn(model)
    assert type(small) is type(model)
    assert attn.num_heads == before.num_heads, "head_dim mode must keep every head"
    assert attn.head_dim == before.head_dim // 2
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim


@pytest.mark.parametrize("name", ["sdpa", "gqa_enable_gqa"])
def test_head_dim_under_sdpa_default_scale_folds_the_scale_into_q(name: str) -> None:
    """SDPA's default scale is 1/sqrt(head_dim): after pruning inside heads it becomes
    1/sqrt(head_dim'), so q's Linear rows are multiplied by sqrt(head_dim'/head_dim) and the
    logits stay what they were (dead-unit oracle exact; apply_plan replays the factor)."""
    model, x = build(name)
    _identity(model, x, "head_dim")
    small = check_dead_channels(model, x, 0.5, attention="head_dim")
    assert _attn(small).head_dim == _attn(model).head_dim // 2
    assert _attn(small).num_heads == _attn(model).num_heads
    small, plan = graphprune.compact_with_plan(model, x, 0.5, attention="head_dim")
    assert plan.scales and all(abs(e["factor"] - 0.5**0.5) < 1e-12 for e in plan.scales)
    replayed = graphprune.apply_plan(model, graphprune.Plan.from_json(plan.to_json()))
    assert_same_outputs(replayed, small, x, rtol=0.0, what="apply_plan with rescaled q rows")


def test_head_dim_falls_back_to_heads_when_q_is_not_linear_in_one_projection() -> None:
    """A nonlinearity between q's Linear and SDPA (here: q scaled by a function of its own norm)
    leaves no row to fold the scale into, so that attention loses whole heads (still exact).

    The nonlinearity is finite at q = 0 (``q / (1 + |q|)``, not ``q / |q|``): a dead head's q is
    exactly zero, and a reference that divides 0 by 0 would be NaN, i.e. no oracle at all."""

    class NormedQ(SdpaAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, N, _ = x.shape
            q = self.q(x).view(B, N, -1, self.head_dim).transpose(1, 2)
            q = q / (1.0 + q.norm(dim=-1, keepdim=True))
            k = self.k(x).view(B, N, -1, self.head_dim).transpose(1, 2)
            v = self.v(x).view(B, N, -1, self.head_dim).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    torch.manual_seed(0)
    model = _randomize(_encoder(NormedQ)).eval()
    x = _features()
    small = check_dead_channels(model, x, 0.5, attention="head_dim")
    assert _attn(small).head_dim == _attn(model).head_dim
    assert _attn(small).num_heads < _attn(model).num_heads


def test_head_dim_with_scale_recomputed_in_forward_is_caught() -> None:
    """``scores / self.head_dim ** 0.5`` in forward changes with head_dim: verify must say so."""
    model, x = build("gqa_expand")
    with pytest.raises(VerificationError, match="head_dim"):
        graphprune.compact(model, x, 0.5, attention="head_dim")


@pytest.mark.parametrize("name", ["gqa_repeat_interleave", "gqa_expand", "gqa_enable_gqa"])
def test_q_heads_within_groups_keep_kv_heads(name: str) -> None:
    model, x = build(name)
    _identity(model, x, "q_heads")
    small = check_dead_channels(model, x, 0.5, attention="q_heads")
    attn, before = _attn(small), _attn(model)
    assert type(small) is type(model)
    assert attn.k_proj.weight.shape == before.k_proj.weight.shape
    assert attn.v_proj.weight.shape == before.v_proj.weight.shape
    assert attn.num_kv_heads == before.num_kv_heads
    assert attn.num_heads == before.num_heads // 2
    assert attn.q_proj.out_features == attn.num_heads * attn.head_dim


@pytest.mark.parametrize("name", ["gqa_expand", "gqa_enable_gqa"])
def test_heads_mode_removes_whole_kv_groups(name: str) -> None:
    model, x = build(name)
    small = graphprune.compact(model, x, 0.5)
    attn, before = _attn(small), _attn(model)
    assert attn.num_kv_heads == before.num_kv_heads // 2
    assert attn.num_heads // attn.num_kv_heads == before.num_heads // before.num_kv_heads


@pytest.mark.parametrize("how", ["expand", "repeat_interleave", "enable_gqa"])
def test_multi_query_attention_loses_q_heads_by_default(how: str) -> None:
    """One kv head: "whole groups" would be everything, so q heads go and the kv head stays."""
    torch.manual_seed(0)
    model = _randomize(_encoder(lambda: GQAAttention(how, num_kv_heads=1), gated=True)).eval()
    x = _features()
    _identity(model, x, "heads")
    small = check_dead_channels(model, x, 0.5)
    attn, before = _attn(small), _attn(model)
    assert attn.num_kv_heads == 1 and attn.k_proj.weight.shape == before.k_proj.weight.shape
    assert attn.num_heads == before.num_heads // 2


@pytest.mark.parametrize(("name", "mode"), [("hand_attention", "head_dim"), ("gqa_expand", "q_heads")])
def test_modes_export_to_onnx_and_leave_the_input_alone(name: str, mode: str) -> None:
    model, x = build(name)
    small = check_input_untouched(model, x, 0.5, attention=mode)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    check_onnx(small, x)


def test_attention_mode_is_recorded_and_replayed() -> None:
    model, x = build("gqa_enable_gqa")
    small, plan = graphprune.compact_with_plan(model, x, 0.5, attention="q_heads")
    assert plan.structure["attention"] == "q_heads"
    again = graphprune.Plan.from_json(plan.to_json())
    assert again.structure == plan.structure
    replayed = graphprune.apply_plan(model, again)
    assert_same_outputs(replayed, small, x, rtol=0.0, what="apply_plan(plan from JSON) vs compact")
    graphprune.verify_model(model, replayed, x, again)  # re-analyses with the plan's own mode


# ------------------------------------------------------------------------------------------
# Hugging Face decoders (tiny configs, random weights)
# ------------------------------------------------------------------------------------------


def test_llama_q_heads_keeps_kv_cache_and_round_trips_through_save_pretrained() -> None:
    import hf_models
    from test_hf_transformers import _assert_same_model, _greedy_without_cache

    model, x = hf_models.build("llama")
    _identity(model, x, "q_heads")
    small = check_dead_channels(model, x, 0.5, attention="q_heads")
    attn = small.model.layers[0].self_attn
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert attn.num_key_value_groups == 1, "q heads per kv head must follow the pruning"
    assert attn.k_proj.weight.shape == model.model.layers[0].self_attn.k_proj.weight.shape
    with tempfile.TemporaryDirectory() as tmp:
        small.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = type(small).from_pretrained(tmp).eval()
    _assert_same_model(again, small, x)
    ids = x["input_ids"]
    out = small.generate(ids, attention_mask=x["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, ids, 3))


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_decoder_head_dim_prunes_rotary_pairs_and_reloads_with_its_plan(name: str) -> None:
    """RoPE rotates channel d with d + head_dim/2 using frequency d: they go together, in every
    layer (the tables are shared), and the frequency buffer is sliced with them. Phi rotates only
    part of each head (``rotary_ndims``), which must follow."""
    import hf_models

    model, x = hf_models.build(name)
    _identity(model, x, "head_dim")
    small = check_dead_channels(model, x, 0.5, attention="head_dim")
    for layer, before in zip(small.model.layers, model.model.layers, strict=True):
        assert layer.self_attn.head_dim == before.self_attn.head_dim // 2
        heads = model.config.num_attention_heads
        assert layer.self_attn.q_proj.out_features == heads * layer.self_attn.head_dim
    assert small.model.rotary_emb.inv_freq.numel() == model.model.rotary_emb.inv_freq.numel() // 2
    small, plan = graphprune.compact_with_plan(model, x, 0.5, attention="head_dim")
    with tempfile.TemporaryDirectory() as tmp:
        graphprune.save(small, tmp, plan)
        again = graphprune.load(tmp, hf_models.build(name, seed=1)[0])
    assert_same_outputs(again, small, x, rtol=1e-6, what="graphprune.load vs compact")
    check_onnx(small, x)


def test_hf_multi_query_decoder_loses_q_heads_and_generates() -> None:
    """LLaMA with one KV head: repeat_kv broadcasts it (the head dim carries no labels), so the
    copies are recognised and q heads go; num_key_value_groups follows."""
    import hf_models
    from test_hf_transformers import _greedy_without_cache
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf_models._randomize(LlamaForCausalLM(cfg)).eval()
    x = hf_models._text()
    small = check_dead_channels(model, x, 0.5)
    attn = small.model.layers[0].self_attn
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert attn.num_key_value_groups == 2
    ids = x["input_ids"]
    out = small.generate(ids, attention_mask=x["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, ids, 3))


def test_verify_catches_heads_regrouped_on_near_uniform_attention() -> None:
    """The Phi bug: head_dim left at its old value in one layer regroups the heads; on random
    weights attention is so uniform that outputs moved by only ~4e-5. verify holds small models
    to their own float32 rounding error, so it must refuse the broken model."""
    import hf_models

    model, x = hf_models.build("phi")
    small, plan = graphprune.compact_with_plan(model, x, 0.5, attention="head_dim")
    graphprune.verify_model(model, small, x, plan)  # the real compact model passes
    attn = small.model.layers[1].self_attn
    attn.head_dim = model.model.layers[1].self_attn.head_dim  # runs, with 2 heads of 8 instead of 4 of 4
    with pytest.raises(VerificationError, match="model.layers.1"):
        graphprune.verify_model(model, small, x, plan)
