"""LLM scale: meta-device planning with default configs, memory-frugal compaction, checkpoints.

Oracles: the plan made on a meta twin equals the plan made on the real weights (same seeded
random scores); the user's model stays bit-identical and shares no memory with the result;
``inplace=True`` gives the same weights as the copying path; a compacted checkpoint loaded with
``from_pretrained`` equals ``graphprune.compact`` of the loaded source (same plan, same tensors).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import graphprune
from graphprune.cli import commands as cli
from graphprune.errors import InputError
from graphprune.planning.importance import random_importance

transformers = pytest.importorskip("transformers")


def _config(**kw):
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=300, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**base, **kw})  # default attention: SDPA


def _llama(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config(**kw)).eval()


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(1))


def test_meta_llama_with_default_config_plans_from_input_ids_alone():
    """SDPA + no attention_mask made HF's mask code call .item() on meta tensors; the meta model
    now runs on fake tensors, and its plan equals the real twin's."""
    cfg = dict(num_key_value_heads=2, num_hidden_layers=1)
    with torch.device("meta"):
        twin = transformers.LlamaForCausalLM(_config(**cfg)).eval()
    assert twin.config._attn_implementation == "sdpa"
    real = _llama(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crit = random_importance(0)
        p_meta = graphprune.make_plan(twin, {"input_ids": _ids().to("meta")}, 0.5, importance=crit)
        p_real = graphprune.make_plan(real, {"input_ids": _ids()}, 0.5, importance=crit)
    d_meta, d_real = p_meta.to_dict(), p_real.to_dict()
    assert p_meta.slices, "nothing planned"
    for key in ("slices", "shapes", "groups", "attr_updates"):
        assert d_meta[key] == d_real[key], key


def test_compact_shares_no_memory_with_the_model_and_leaves_it_bit_identical():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = graphprune.compact(model, {"input_ids": _ids()}, 0.5)
    ours = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not [n for n, t in small.state_dict().items() if t.untyped_storage().data_ptr() in ours]
    with torch.no_grad():  # training the compact model must not reach the user's weights
        for p in small.parameters():
            p.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inplace_returns_the_model_itself_with_the_copying_paths_weights():
    x = {"input_ids": _ids()}
    copied = graphprune.compact(_llama(), x, 0.5)
    model = _llama()
    small = graphprune.compact(model, x, 0.5, inplace=True)
    assert small is model
    a, b = copied.state_dict(), small.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert small.config.num_attention_heads == copied.config.num_attention_heads == 2
    assert small.config.intermediate_size == copied.config.intermediate_size == 80
    with torch.no_grad():
        assert torch.equal(small(**x).logits, copied(**x).logits)


def test_inplace_refuses_targets():
    with pytest.raises(InputError, match="inplace"):
        graphprune.compact(_llama(), {"input_ids": _ids()}, inplace=True, target_params=0.5)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ckpt") / "src"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _llama(seed=3).save_pretrained(src, max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    return src


def _shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_checkpoint_equals_compact_of_the_loaded_model(sharded, tmp_path):
    dst = tmp_path / "dst"
    result = graphprune.compact_checkpoint(sharded, dst, 0.5, progress=False)
    assert result.config_updated
    assert _shard_names(dst) == _shard_names(sharded)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == result.bytes_out < result.bytes_in
    loaded = transformers.LlamaForCausalLM.from_pretrained(sharded).eval()
    expected, plan = graphprune.compact_with_plan(loaded, {"input_ids": _ids()}, 0.5)
    assert plan.slices == result.plan.slices
    got = transformers.LlamaForCausalLM.from_pretrained(dst).eval()
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, expected(input_ids=_ids()).logits)


def test_checkpoint_that_config_cannot_describe_keeps_config_and_saves_the_plan(sharded, tmp_path):
    """head_dim pruning: the closest config (2 heads of 16 instead of 4 heads of 8) has the right
    shapes but other head sizes, so (like compact) config.json stays; the plan goes beside it."""
    from safetensors.torch import load_file

    dst = tmp_path / "dst"
    result = graphprune.compact_checkpoint(sharded, dst, 0.5, progress=False, attention="head_dim")
    assert not result.config_updated
    assert (dst / "config.json").read_text() == (sharded / "config.json").read_text()
    loaded = transformers.LlamaForCausalLM.from_pretrained(sharded).eval()
    expected, plan = graphprune.compact_with_plan(loaded, {"input_ids": _ids()}, 0.5, attention="head_dim")
    assert graphprune.Plan.from_json((dst / "graphprune_plan.json").read_text()).slices == plan.slices
    want = expected.state_dict()
    got = {k: v for f in _shard_names(dst) for k, v in load_file(dst / f).items()}
    assert got.keys() <= want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    base = transformers.LlamaForCausalLM(loaded.config).eval()  # how docs/llm.md loads such a folder
    small = graphprune.apply_plan(base, graphprune.Plan.from_json((dst / "graphprune_plan.json").read_text()))
    small.load_state_dict(got, strict=False)
    with torch.no_grad():
        assert torch.equal(small(input_ids=_ids()).logits, expected(input_ids=_ids()).logits)


def test_checkpoint_cli_writes_a_loadable_folder(sharded, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli.main(["checkpoint", str(sharded), str(dst), "--ratio", "0.5", "--quiet"]) == 0
    assert "config.json updated" in capsys.readouterr().out
    small = transformers.LlamaForCausalLM.from_pretrained(dst)
    assert small.config.intermediate_size == 80
    assert (dst / "graphprune_plan.json").is_file()


def test_checkpoint_bad_input_leaves_nothing_behind(sharded, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not a folder"):
        graphprune.compact_checkpoint(tmp_path / "nope", tmp_path / "a")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    next(broken.glob("*-00002-*.safetensors")).unlink()
    with pytest.raises(InputError, match="missing"):
        graphprune.compact_checkpoint(broken, tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        graphprune.compact_checkpoint(sharded, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    import safetensors.torch

    calls = []
    real_save = safetensors.torch.save_file

    def failing_save(*args, **kwargs):  # the disk fills up after the first shard
        calls.append(1)
        if len(calls) > 1:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        graphprune.compact_checkpoint(sharded, tmp_path / "c", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]
