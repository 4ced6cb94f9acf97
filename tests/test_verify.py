"""compact(verify=True) checks the compact model against a reference computed from the plan.

The reference (graphprune/verify.py, graphprune/reference/) is the original traced program with every removed
position held at zero. These tests check both directions:

* it agrees with correct compact models (CNN families, transformers, with and without
  ``prune_hidden``), and is not vacuous (it differs from the unpruned original);
* it catches wrong ones: a corrupted surgery, a corrupted plan, and a rule that lies about an
  op, each with a ``VerificationError`` that names the layer or group, and the user's model
  left untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import assert_untouched, relative_error, snapshot
from torch import nn

import graphprune
import graphprune.engine as engine
from graphprune import zoo
from graphprune.graph.inputs import flatten_outputs, run_model
from graphprune.graph.rules import registry as rules
from graphprune.graph.rules.pointwise import unary
from graphprune.graph.rules.registry import ops
from graphprune.reference.interpreter import rebinds
from graphprune.reference.masks import removed_classes
from graphprune.reference.run import reference_outputs


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    return flatten_outputs(run_model(model, x))


def _assert_verified(report: graphprune.VerifyReport) -> None:
    assert report.exact, f"numeric check skipped: {report.skipped}"
    assert report.errors, "nothing was compared"
    for err, tol in zip(report.errors, report.tolerances, strict=True):
        assert err <= tol, f"relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("name", ["resnet18", "densenet", "shufflenetv2", "mobilenetv3", "unet", "vit_tiny"])
def test_compact_model_matches_the_plans_reference_on_zoo_models(name: str) -> None:
    model, x = zoo.build(name)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.4)
    assert any(g.removed for g in plan.groups), "nothing was pruned: the check would be vacuous"
    _assert_verified(graphprune.verify_model(model, small, x, plan))


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ids = torch.randint(0, 64, (2, 8))
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=64, **common)
        return transformers.BertModel(cfg).eval(), {"input_ids": ids}
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}
    cfg = transformers.LlamaConfig(vocab_size=64, num_key_value_heads=2, **common)
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": ids}


@pytest.mark.parametrize("prune_hidden", [False, True], ids=["heads+mlp", "prune_hidden"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_compact_transformer_matches_the_plans_reference(name: str, prune_hidden: bool) -> None:
    """With prune_hidden the reference computes LayerNorm/RMSNorm over the kept channels only."""
    model, x = _hf(name)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5, prune_hidden=prune_hidden)
    assert any(g.removed for g in plan.groups)
    _assert_verified(graphprune.verify_model(model, small, x, plan, prune_hidden=prune_hidden))


def test_reference_differs_from_the_original_and_equals_it_at_ratio_zero() -> None:
    """The reference really removes something (so agreeing with it means something)."""
    model, x = zoo.build("resnet18")
    analysis = graphprune.analyze(model, x)
    for ratio, same in ((0.0, True), (0.4, False)):
        plan = graphprune.make_plan(model, x, ratio=ratio)
        ref = reference_outputs(analysis, removed_classes(analysis, plan), model, x)
        err = relative_error(ref[0], _outputs(model, x)[0])
        assert (err == 0.0) if same else (err > 1e-3), f"ratio {ratio}: reference vs original {err:.3g}"


# ------------------------------------------------------------------------------------------
# Wrong results are caught
# ------------------------------------------------------------------------------------------


def _corrupting_slicer(target: str):
    """A surgery that slices ``target`` dim 0 with one wrong kept index (a plausible off-by-one)."""
    real = engine.slice_tensors

    def wrong(model: nn.Module, plan: graphprune.Plan, *rest) -> None:
        bad = copy.deepcopy(plan)
        kept = bad.slices[target][0]
        dropped = sorted(set(range(bad.shapes[target][0])) - set(kept))
        kept[kept.index(max(kept))] = dropped[-1] if dropped[-1] > max(kept) else kept[-1]
        kept[0] = dropped[0] if dropped[0] < kept[1] else kept[0]
        assert kept != plan.slices[target][0], "the corruption changed nothing"
        bad.slices[target][0] = sorted(kept)
        real(model, bad, *rest)

    return wrong


def test_corrupted_surgery_raises_verification_error_naming_the_layer(monkeypatch) -> None:
    model, x = zoo.build("resnet18")
    target = "layers.0.0.conv1.weight"
    plan = graphprune.make_plan(model, x, ratio=0.4)
    assert target in plan.slices and 0 in plan.slices[target]
    monkeypatch.setattr(engine, "slice_tensors", _corrupting_slicer(target))
    before = snapshot(model)

    with pytest.raises(graphprune.VerificationError) as info:
        graphprune.compact(model, x, ratio=0.4)
    msg = str(info.value)
    assert "layers.0.0.conv1" in msg and "group" in msg, msg
    assert_untouched(model, before)

    # without verification the same surgery silently returns a model of the right shape
    wrong = graphprune.compact(model, x, ratio=0.4, verify=False)
    assert _outputs(wrong, x)[0].shape == _outputs(model, x)[0].shape


def test_plan_that_removes_part_of_a_unit_is_rejected() -> None:
    model, x = zoo.build("resnet18")
    plan = graphprune.make_plan(model, x, ratio=0.4)
    name = "layers.0.0.conv1.weight"
    kept = plan.slices[name][0]
    dropped = sorted(set(range(plan.shapes[name][0])) - set(kept))
    plan.slices[name][0] = sorted(kept[1:] + dropped[:1])  # one kept index swapped for a removed one
    small = graphprune.apply_plan(model, plan)  # same shapes: replay alone cannot notice
    with pytest.raises(graphprune.VerificationError, match=r"part of a coupled unit.*group \d+"):
        graphprune.verify_model(model, small, x, plan)


def test_plan_that_reorders_channels_is_rejected() -> None:
    model, x = zoo.build("resnet18")
    plan = graphprune.make_plan(model, x, ratio=0.4)
    name = "layers.0.0.conv1.weight"
    kept = plan.slices[name][0]
    kept[0], kept[1] = kept[1], kept[0]
    small = graphprune.apply_plan(model, plan)
    with pytest.raises(graphprune.VerificationError, match="not strictly increasing"):
        graphprune.verify_model(model, small, x, plan)


class SoftmaxOverFeatures(nn.Module):
    """softmax over the hidden features: removing a feature changes every other one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


def test_a_rule_that_misdescribes_an_op_is_caught(monkeypatch) -> None:
    """If softmax were (wrongly) treated as elementwise, its features would be pruned: verify says no."""
    model, x = SoftmaxOverFeatures().eval(), torch.randn(4, 6)
    small = graphprune.compact(model, x, ratio=0.5)  # the real rule keeps the features whole
    assert small.fc1.out_features == 16

    for op in ops("softmax.int", "_softmax.default"):
        monkeypatch.setitem(rules._RULES, op, unary)
    with pytest.raises(graphprune.VerificationError, match="fc1|fc2"):
        graphprune.compact(model, x, ratio=0.5)


class InPlaceResidual(nn.Module):
    """In-place ops on a pruned activation that a second reader sees afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.conv2(y)
        y += self.shift  # in place: pruned positions of y become non-zero in a naive reference
        y.relu_()
        return self.conv3(y + z)


def test_in_place_ops_are_handled_by_the_reference() -> None:
    torch.manual_seed(0)
    model, x = InPlaceResidual().eval(), torch.randn(2, 3, 8, 8)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    assert small.conv1.out_channels < 8
    _assert_verified(graphprune.verify_model(model, small, x, plan))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def test_layer_norm_over_pruned_features_is_exact_with_prune_hidden() -> None:
    """prune_hidden=True prunes through the LayerNorm; the reference normalises over kept features."""
    model, x = LayerNormMLP().eval(), torch.randn(4, 8)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    assert graphprune.compact(model, x, ratio=0.5).fc1.out_features == 16  # frozen by default
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5, prune_hidden=True)
    assert small.fc1.out_features == 8
    _assert_verified(graphprune.verify_model(model, small, x, plan, prune_hidden=True))
    # and the reference is the normalisation over the kept features, not over zero-padded ones
    keep = torch.tensor(plan.slices["fc1.weight"][0])
    h = model.fc1(x)[:, keep]
    expected = model.fc2.weight[:, keep] @ torch.relu(
        nn.functional.layer_norm(h, (8,), model.norm.weight[keep], model.norm.bias[keep])
    ).T
    torch.testing.assert_close(_outputs(small, x)[0], expected.T + model.fc2.bias)


class _FirstCallCache(nn.Module):
    """Replaces a placeholder buffer by a cache of another shape on its first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("cache", torch.zeros(1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.shape[0] != x.shape[1]:
            self.cache = torch.arange(x.shape[1] * 4, dtype=x.dtype).reshape(x.shape[1], 4)
        return self.b(torch.relu(self.a(x))) + self.cache


@pytest.mark.parametrize("tracer", ["fast", "export"])
def test_a_buffer_replaced_by_another_shape_is_rebound_in_the_reference(monkeypatch, tracer: str) -> None:
    # torch.export records ``self.cache = new`` as a copy into the old buffer, which cannot hold
    # it: the reference must rebind it as the forward does (it raised a RuntimeError before)
    if tracer == "export":
        monkeypatch.setenv("GRAPHPRUNE_TRACE", "export")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = _FirstCallCache().eval()
    same = graphprune.compact(model, x, 0.0)
    torch.testing.assert_close(same(x), model(x))  # identity at ratio 0
    small = graphprune.compact(_FirstCallCache().eval(), x, 0.5)  # verify=True: checked against it
    assert small.a.out_features < 16 and small(x).shape == (2, 5, 4)
    for dst, src in ((torch.zeros(1, 1), torch.zeros(5, 4)), (torch.zeros(5, 4), torch.zeros(4))):
        g = torch.fx.Graph()
        a, b = g.placeholder("buf"), g.placeholder("new")
        a.meta["val"], b.meta["val"] = dst, src
        node = g.call_function(torch.ops.aten.copy_.default, (a, b))
        assert rebinds(node) == (src.shape != (4,))  # a broadcasting copy is a real copy
