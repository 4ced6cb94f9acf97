"""The plan: readable, JSON round trip, and replaying it reproduces compact() exactly."""

from __future__ import annotations

import pytest
import torch

import graphprune
from graphprune import zoo
from graphprune.errors import PlanMismatchError
from graphprune.graph.analysis import to_networkx
from graphprune.graph.inputs import flatten_outputs, run_model


@pytest.mark.parametrize("name", ["resnet18", "shufflenetv2", "mobilenetv3"])
def test_replaying_a_json_plan_reproduces_compact_exactly(name: str) -> None:
    model, x = zoo.build(name, "tiny")
    model.eval()
    small, plan = graphprune.compact_with_plan(model, x, 0.4)
    again = graphprune.apply_plan(model, graphprune.Plan.from_json(plan.to_json()))
    assert type(again) is type(model)
    for a, b in zip(flatten_outputs(run_model(small, x)), flatten_outputs(run_model(again, x)), strict=True):
        assert torch.equal(a, b)
    assert {k: v.shape for k, v in small.state_dict().items()} == {
        k: v.shape for k, v in again.state_dict().items()
    }


def test_plan_summary_names_pruned_and_frozen_groups() -> None:
    model, x = zoo.build("resnet18", "tiny")
    plan = graphprune.make_plan(model, x, 0.5)
    text = str(plan)
    assert "groups pruned" in text and "units kept" in text
    assert "model output" in text  # the classifier's outputs are kept, and the plan says why
    assert any(g.removed for g in plan.groups)


def test_plan_for_another_architecture_is_rejected_with_a_clear_error() -> None:
    model, x = zoo.build("resnet18", "tiny")
    plan = graphprune.make_plan(model, x, 0.5)
    other, _ = zoo.build("vgg", "tiny")
    with pytest.raises(PlanMismatchError):
        graphprune.apply_plan(other, plan)


def test_unknown_op_is_a_boundary_reported_in_the_plan() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 16)
            self.b = torch.nn.Linear(16, 16)
            self.c = torch.nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.a(x)))
            h = torch.fft.fft(h).real  # mixes all features: no rule, must freeze
            return self.c(h)

    model, x = Odd().eval(), torch.randn(3, 4)
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert any("fft" in b for b in plan.boundaries), plan.boundaries
    assert small.b.out_features == 16  # frozen by the boundary
    assert small.a.out_features == 8  # the group before it is still pruned
    assert small(x).shape == model(x).shape


def test_class_that_cannot_run_smaller_falls_back_to_a_working_graph_with_a_warning() -> None:
    # timm-style attention merges heads with reshape(B, N, C), C read off the *input*: after
    # head pruning the user's class cannot run. fallback="graph" prunes everything anyway and
    # returns a GraphModule with the same weights (re-exported with a dynamic batch dimension).
    model, x = zoo.build("vit_tiny", "tiny")
    model.eval()
    with pytest.warns(UserWarning, match="GraphModule"):
        small, plan = graphprune.compact_with_plan(model, x, 0.5, fallback="graph")
    assert isinstance(small, torch.fx.GraphModule)
    assert any("GraphModule" in n for n in plan.notes)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    out = flatten_outputs(run_model(small, x))[0]
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    x3 = torch.cat([x, x[:1]])  # another batch size: rows computed as at batch 2
    torch.testing.assert_close(small(x3)[:2], out, rtol=1e-5, atol=1e-6)


def test_class_that_cannot_run_smaller_is_rewritten_by_default_or_kept_whole_on_request() -> None:
    model, x = zoo.build("vit_tiny", "tiny")
    model.eval()
    with pytest.warns(UserWarning, match="rewritten as graphs"):
        small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert type(small) is type(model) and list(small.state_dict()) == list(model.state_dict())
    assert all(b.attn.qkv.out_features < 3 * 32 for b in small.blocks), "heads pruned (docs/rewrite.md)"
    assert small(torch.cat([x, x[:1]])).shape[0] == 3
    with pytest.warns(UserWarning, match="kept whole"):
        small, plan = graphprune.compact_with_plan(model, x, 0.5, fallback="whole")
    assert type(small) is type(model)
    assert all(b.attn.qkv.out_features == 3 * 32 for b in small.blocks), "attention kept whole"
    assert all(b.fc1.out_features < model.blocks[0].fc1.out_features for b in small.blocks)
    assert small(torch.cat([x, x[:1]])).shape[0] == 3


def test_group_graph_exports_to_networkx() -> None:
    model, x = zoo.build("resnet18", "tiny")
    g = to_networkx(graphprune.analyze(model, x))
    groups = [n for n in g.nodes if n.startswith("group:")]
    assert groups and all(g.degree(n) >= 1 for n in groups)


def test_ignored_layers_accepts_module_objects_and_names_and_rejects_strangers() -> None:
    model, x = zoo.build("mlp", "tiny")
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    name = next(n for n, m in model.named_modules() if m is first)
    for ignored in ([first], [name]):
        small = graphprune.compact(model, x, 0.5, ignored_layers=ignored)
        assert small.get_submodule(name).weight.shape == first.weight.shape, ignored
    with pytest.raises(graphprune.InputError, match="not a submodule"):
        graphprune.compact(model, x, 0.5, ignored_layers=[torch.nn.Linear(2, 2)])
    with pytest.raises(graphprune.InputError, match="not a module of the model"):
        graphprune.compact(model, x, 0.5, ignored_layers=["no.such.layer"])
