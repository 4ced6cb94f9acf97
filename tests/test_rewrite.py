"""Submodules whose own code cannot run smaller are rewritten as graphs, not kept whole.

Three micro-models, each reading a size graphprune cannot update (tests/rewrite_models.py): an
attention that merges heads back to the width read off its input (timm's ViT family), and a
cross-stage-partial stage that splits by a width stored in an attribute (timm's CSP family), and
a windowed attention taking its token grid as a tuple, whose shifted blocks differ from the
unshifted ones only in a list attribute (timm's PVT-v2, torchvision's Swin), and which fills a
cache buffer on its first forward (timm's ConViT).
Before the rewrite both came back with those modules kept whole (attention heads and the CSP
channels not pruned). Every test checks the result against an independent oracle.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import graphprune
from tests.oracles import (
    assert_same_outputs,
    check_dead_channels,
    check_onnx,
    check_ratio_zero_identity,
    make_dead,
)
from tests.rewrite_models import TinyCsp, TinyViT, TinyWindowed

CASES = {
    "attention": (TinyViT, (2, 6, 12), "blocks.0.attn", "blocks.0.attn.qkv.weight"),
    "csp": (TinyCsp, (2, 3, 8, 8), "stages.0", "stages.0.conv_exp.0.weight"),
    # a tuple argument (the token grid), a list attribute telling shifted blocks apart, a cache
    "windowed": (TinyWindowed, (2, 3, 4, 4), "blocks.1.attn", "blocks.1.attn.qkv.weight"),
}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    cls, shape, _, _ = CASES[name]
    torch.manual_seed(0)
    return cls().eval(), torch.randn(*shape)


@functools.cache
def _compacted(name: str) -> tuple:
    model, x = _build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, plan = graphprune.compact_with_plan(model, x, ratio=0.5, verify=True)
    return name, model, x, small, plan, [str(w.message) for w in caught]


@pytest.fixture(scope="module", params=list(CASES))
def compacted(request):
    return _compacted(request.param)


def test_rewritten_modules_are_pruned_and_the_outer_class_kept(compacted) -> None:
    name, model, x, small, plan, messages = compacted
    _, _, path, weight = CASES[name]
    assert type(small) is type(model)
    assert list(small.state_dict()) == list(model.state_dict())
    before = model.state_dict()[weight].shape[0]
    after = small.state_dict()[weight].shape[0]
    assert after < before, f"{weight} kept all {before} rows: the module at fault was kept whole"
    assert graphprune.count_params(small) < graphprune.count_params(model)
    assert path in [r["module"] for r in plan.rewrites]
    assert any("rewritten as graphs" in m and path in m for m in messages), messages
    assert any("rewritten as graphs" in n for n in plan.notes)
    # the graph takes any batch size, and gradients flow to the user's own Parameters
    out = small(torch.cat([x, x, x[:1]]))
    assert out.shape[0] == 2 * x.shape[0] + 1
    out.sum().backward()
    assert small.get_parameter(weight).grad is not None


def test_ratio_zero_is_the_identity() -> None:
    for name in CASES:
        check_ratio_zero_identity(*_build(name))


@pytest.mark.parametrize("name", list(CASES))
def test_removing_dead_units_leaves_outputs_unchanged_in_eval_and_train(name: str) -> None:
    model, x = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = check_dead_channels(model, x, 0.5, round_to=1)
    assert type(small) is type(model)
    rewritten = [m for m in small.modules() if type(m).__name__ == "Rewritten"]
    assert rewritten, "nothing was rewritten: the dead-unit check did not exercise the rewrite"
    # train mode runs the train-mode graph (batch statistics): it must agree with the user's code
    # on the same dead model (whose dead units stay exactly zero through the batch norms)
    dead = make_dead(model, x, 0.5, slack=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = graphprune.compact(dead.model, x, ratio=0.5, importance=dead.importance, round_to=1)
    a, b = copy.deepcopy(small).train(), copy.deepcopy(dead.model).train()
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_graphprune_save_load_and_state_dict_round_trips(compacted, tmp_path) -> None:
    name, _, x, small, plan, _ = compacted
    graphprune.save(small, tmp_path / "saved", plan)
    base, _ = _build(name)
    loaded = graphprune.load(tmp_path / "saved", base, example_input=x)
    assert type(loaded) is type(small)
    saved = graphprune.Plan.from_text((tmp_path / "saved" / "plan.json").read_text())
    assert [r["module"] for r in saved.rewrites] == [r["module"] for r in plan.rewrites]
    assert_same_outputs(loaded, small, x, rtol=0.0, what="graphprune.load vs the compact model")
    torch.manual_seed(1)
    other = graphprune.load(tmp_path / "saved", _build(name)[0])
    other.load_state_dict(small.state_dict())  # a plain state_dict round trip
    assert_same_outputs(other, small, x, rtol=0.0, what="state_dict round trip")


def test_onnxruntime_equals_torch(compacted) -> None:
    _, _, x, small, plan, _ = compacted
    assert plan.rewrites, "nothing was rewritten: this would only test the user's own code"
    check_onnx(small, x)


def test_a_tampered_rewrite_record_is_refused_on_load(compacted, tmp_path) -> None:
    import json

    name, _, _, small, plan, _ = compacted
    graphprune.save(small, tmp_path / "saved", plan)
    path = tmp_path / "saved" / "plan.json"
    d = json.loads(path.read_text())
    d["rewrites"][0]["changes"][0]["old"] += 1  # the export does not hold that constant there
    path.write_text(json.dumps(d))
    with pytest.raises(graphprune.PlanMismatchError, match="rewrite"):
        graphprune.load(tmp_path / "saved", _build(name)[0])


def test_a_rewritten_module_refuses_a_plain_argument_it_was_not_exported_at() -> None:
    """The token grid is a constant of the graph: another grid must fail loudly, not run wrong."""
    _, _, _, small, plan, _ = _compacted("windowed")
    assert "blocks.1.attn" in [r["module"] for r in plan.rewrites]
    attn = small.blocks[1].attn
    tokens = torch.randn(2, 16, small.blocks[1].norm1.normalized_shape[0])
    assert attn(tokens, (4, 4)).shape == tokens.shape
    with pytest.raises(graphprune.InputError, match="rewritten as a graph"):
        attn(tokens, (2, 8))


def test_a_recorded_sequence_argument_is_checked_on_load(tmp_path) -> None:
    import json

    _, _, _, small, plan, _ = _compacted("windowed")
    graphprune.save(small, tmp_path / "saved", plan)
    path = tmp_path / "saved" / "plan.json"
    d = json.loads(path.read_text())
    grid = d["rewrites"][0]["inputs"]["args"][1]
    assert grid == {"value": [4, 4], "sequence": "tuple"}, grid  # the token grid, a tuple
    grid["sequence"] = "set"
    path.write_text(json.dumps(d))
    with pytest.raises(graphprune.PlanMismatchError, match="sequence"):
        graphprune.load(tmp_path / "saved", _build("windowed")[0])
