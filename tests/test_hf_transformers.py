"""compact() on Hugging Face transformers built from tiny configs (tests/hf_models.py), no settings.

Every model gets the generic oracles (``oracles.OracleSuite``: ratio 0 identical, exactly dead
units removed with outputs unchanged, onnxruntime agrees, input model untouched, same class,
fewer parameters). Decoder LMs
must still ``generate()`` (checked against a greedy loop without cache), and a compact model must
reload with identical outputs: through ``save_pretrained``/``from_pretrained`` where graphprune
could update ``model.config``, else through ``graphprune.save``/``graphprune.load``.

A representative subset (a ViT, BERT, GPT-2 and LLaMA) runs by default; the other architectures
are marked ``slow`` and run with ``pytest -m slow`` (or GRAPHPRUNE_SLOW=1).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import pytest

pytest.importorskip("transformers")

import hf_models  # noqa: E402
import torch  # noqa: E402
from oracles import OracleSuite, assert_same_outputs, compacted  # noqa: E402
from torch import nn  # noqa: E402

import graphprune  # noqa: E402

RATIO = 0.3
FAST = ("vit", "bert", "gpt2", "llama")
# Architectures whose config can describe fewer heads: head_dim is (or can be made) a config field.
# The others derive the head width from hidden_size / num_heads (BERT, GPT-2, CLIP, Whisper...) or
# the MLP width from an integer ratio (DINOv2), so their compact widths cannot be written into the
# config: they reload through graphprune.save / graphprune.load.
CONFIG_ROUND_TRIP = {"vit", "deit", "llama", "qwen2", "mistral", "phi"}


def _param(name: str) -> Any:
    return pytest.param(name, id=name, marks=() if name in FAST else pytest.mark.slow)


MODELS = [_param(n) for n in hf_models.BUILDERS]
DECODERS = [_param(n) for n in hf_models.DECODERS]


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") is None or os.environ.get("GRAPHPRUNE_SLOW"):
        return
    if "slow" not in (request.config.getoption("markexpr", "") or "").replace("not slow", ""):
        pytest.skip("slow architecture: run with -m slow or GRAPHPRUNE_SLOW=1")


def _compacted(name: str) -> tuple[nn.Module, Any, nn.Module, graphprune.Plan]:
    """(model, input, compact model, plan), compacted once per session for the suite and the tests."""
    c = compacted(hf_models.build, name, RATIO)
    return c.model, c.example_input, c.small, c.plan


@pytest.mark.parametrize("name", MODELS)
class TestGenericOracles(OracleSuite):
    build = hf_models.build
    ratio = RATIO
    flops = False


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", DECODERS)
def test_compact_decoder_generates_like_a_greedy_loop_without_cache(name: str) -> None:
    _, x, small, _ = _compacted(name)
    ids = x["input_ids"]
    with torch.no_grad():
        out = small.generate(ids, attention_mask=x["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, ids, 3))


@pytest.mark.parametrize("name", MODELS)
def test_compact_model_reloads_with_identical_outputs(name: str) -> None:
    model, x, small, plan = _compacted(name)
    updated = [n for n in plan.notes if n.startswith("model.config updated")]
    with tempfile.TemporaryDirectory() as tmp:
        if name in CONFIG_ROUND_TRIP:
            assert updated, plan.notes
            small.save_pretrained(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = type(small).from_pretrained(tmp).eval()
        else:
            assert not updated and small.config.to_dict() == model.config.to_dict()
            graphprune.save(small, tmp, plan)
            base, _ = hf_models.build(name, seed=1)  # same architecture, other weights
            again = graphprune.load(tmp, base)
    _assert_same_model(again, small, x)


def _assert_same_model(again: nn.Module, small: nn.Module, x: Any) -> None:
    """Bit-identical tensors and attributes; outputs equal up to float rounding.

    Reloaded weights can sit at other memory alignments (safetensors maps the file), which may
    change how a BLAS kernel orders its sums: a few ulps, not a different model.
    """
    a, b = again.state_dict(), small.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert repr(again) == repr(small)
    assert_same_outputs(again, small, x, rtol=1e-6, what="reloaded vs compact")


def test_llama_config_gets_the_new_head_counts_and_widths() -> None:
    model, _, small, _ = _compacted("llama")
    cfg, old = small.config, model.config
    assert (old.num_attention_heads, old.num_key_value_heads) == (4, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1), "one kv group of 2 q heads goes"
    assert cfg.intermediate_size == small.model.layers[0].mlp.gate_proj.out_features == 45
    assert cfg.head_dim == old.head_dim and cfg.hidden_size == old.hidden_size


def test_llama_with_prune_hidden_updates_hidden_size_and_still_generates() -> None:
    model, x = hf_models.build("llama")
    small = graphprune.compact(model, x, ratio=RATIO, prune_hidden=True)
    assert small.config.hidden_size == small.model.embed_tokens.weight.shape[1] == 22
    with tempfile.TemporaryDirectory() as tmp:
        small.save_pretrained(tmp)
        again = type(small).from_pretrained(tmp).eval()
    _assert_same_model(again, small, x)
    ids = x["input_ids"]
    out = small.generate(ids, attention_mask=x["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, ids, 3))


def test_gpt2_with_prune_hidden_keeps_its_lm_head_tied_to_the_embedding() -> None:
    model, x = hf_models.build("gpt2")
    small = graphprune.compact(model, x, ratio=RATIO, prune_hidden=True)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.transformer.wte.weight.shape[1] < model.transformer.wte.weight.shape[1]
    assert small(**x).logits.shape == model(**x).logits.shape


def test_config_left_alone_when_its_own_validation_refuses_and_graphprune_load_rebuilds() -> None:
    """LlamaConfig wants hidden_size % num_attention_heads == 0: 8 -> 6 heads at hidden 64 fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=32)
    torch.manual_seed(0)
    model, x = LlamaForCausalLM(config).eval(), {"input_ids": hf_models._tokens()}
    small, plan = graphprune.compact_with_plan(model, x, ratio=RATIO)
    assert small.model.layers[0].self_attn.q_proj.out_features == 6 * 8
    assert small.config.to_dict() == model.config.to_dict()
    assert any("refuses" in n and "not a multiple" in n for n in plan.notes), plan.notes
    with tempfile.TemporaryDirectory() as tmp:
        graphprune.save(small, tmp, plan)
        again = graphprune.load(tmp, LlamaForCausalLM(config))
    _assert_same_model(again.eval(), small, x)


def test_encoder_decoder_whose_stacks_keep_their_own_config_is_traced_without_cache() -> None:
    """T5's decoder stack holds a copy of the config: use_cache off on the model's config alone
    left it returning an EncoderDecoderCache, which torch.export cannot output."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(1, 64, (2, 6))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :4]}
    small = graphprune.compact(model, x, ratio=0.3)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    assert small.config.use_cache and small.decoder.config.use_cache  # restored on the copies
    assert model.decoder.config.use_cache
    assert small.generate(ids[:1], max_new_tokens=3, do_sample=False).shape[1] >= 2
