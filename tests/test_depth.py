"""Depth pruning: residual blocks found in the graph, removed from the user's own class.

Oracles: a block made an identity (its branch's last projections zeroed) is the one removed and
the outputs do not move; depth 0 is the identity; blocks with a downsampling shortcut or a
broadcasting add are never offered; the plan replays on a fresh model; onnxruntime agrees.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
from torch import nn

import graphprune
from graphprune.errors import InputError


class Block(nn.Module):
    """x + f(x), f = Linear -> ReLU -> Linear (the identity shortcut a depth cut may remove)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Down(nn.Module):
    """A residual block whose shortcut is a projection (downsampling): never removable."""

    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, out)
        self.fc = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.fc(x)


class Broadcast(nn.Module):
    """x + f(x) where f gives one value per row: the add broadcasts, so x's shape is not kept."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class Net(nn.Module):
    def __init__(self, d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.bcast = Broadcast(d)
        self.down = Down(d, 5)
        self.extra = Block(5)  # a named attribute, not in a container: replaced by Skip
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.extra(self.down(self.bcast(x))))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


def test_identity_shortcut_blocks_are_found_and_downsampling_or_broadcast_ones_are_not() -> None:
    blocks = graphprune.find_blocks(_net(), X)
    removable = sorted(b.module for b in blocks if b.removable)
    assert removable == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "extra"]
    assert not any(b.module in ("down", "bcast") for b in blocks)  # not residual adds at all
    b1 = next(b for b in blocks if b.module == "blocks.1")
    assert b1.modules == ["blocks.1"] and b1.container == "blocks" and b1.position == 1
    assert b1.outputs == ["blocks.1.fc2.bias", "blocks.1.fc2.weight"]


def test_a_block_made_identity_is_the_one_removed_and_outputs_do_not_move() -> None:
    model = _net()
    with torch.no_grad():
        model.blocks[2].fc2.weight.zero_()
        model.blocks[2].fc2.bias.zero_()
        before = model(X)
        state = {k: v.clone() for k, v in model.state_dict().items()}
    small, plan = graphprune.compact_with_plan(model, X, depth=1)
    assert type(small) is Net and len(small.blocks) == 3
    assert [e["module"] for e in plan.depth] == ["blocks.2"] and plan.depth[0]["score"] == 0.0
    with torch.no_grad():
        assert _close(small(X), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # user's model untouched
    assert len(model.blocks) == 4


def test_depth_zero_is_the_identity() -> None:
    model = _net()
    small = graphprune.compact(model, X, ratio=0.0, depth=0)
    with torch.no_grad():
        assert torch.equal(small(X), model(X))
    assert len(small.blocks) == 4


def test_a_named_attribute_block_is_replaced_by_skip_and_the_forward_still_runs() -> None:
    model = _net()
    with torch.no_grad():
        model.extra.fc2.weight.zero_()
        model.extra.fc2.bias.zero_()
    small = graphprune.compact(model, X, depth=1)
    assert type(small.extra).__name__ == "Skip"
    with torch.no_grad():
        assert _close(small(X), model(X))


def test_depth_fraction_rounds_and_bad_values_are_refused() -> None:
    small = graphprune.compact(_net(), X, depth=0.4)  # round(0.4 * 5) = 2
    assert len(small.blocks) + (type(small.extra).__name__ != "Skip") == 3
    for bad in (1.5, -0.1, 6, "half", True):
        with pytest.raises(InputError):
            graphprune.compact(_net(), X, depth=bad)
    with pytest.raises(InputError):
        graphprune.compact(_net(), X, depth=1, depth_importance="cosine")  # needs data


def test_cosine_scores_need_data_and_pick_the_block_that_changes_least() -> None:
    model = _net()
    with torch.no_grad():  # block 0 barely changes its input; weight-only RMS would not see it
        model.blocks[0].fc2.weight.mul_(1e-3)
        model.blocks[0].fc2.bias.zero_()
        model.blocks[3].fc2.weight.mul_(1e-4)  # the smallest output projection...
        model.blocks[3].fc2.bias.zero_()
        model.blocks[3].fc1.weight.mul_(1e4)  # ... behind a huge fc1: it changes x the most
    data = [torch.randn(4, 6) for _ in range(2)]
    _, plan = graphprune.compact_with_plan(model, X, depth=1, data=data)
    assert [e["module"] for e in plan.depth] == ["blocks.0"]
    _, plan = graphprune.compact_with_plan(model, X, depth=1)
    assert [e["module"] for e in plan.depth] == ["blocks.3"]  # the weight default is fooled


def test_a_target_with_depth_describes_the_whole_model() -> None:
    model = _net()
    small = graphprune.compact(model, X, depth=1, target_flops=0.6)
    kept = graphprune.count_flops(small, X) / graphprune.count_flops(model, X)
    assert len(small.blocks) + (type(small.extra).__name__ != "Skip") == 4 and 0.55 <= kept <= 0.612


def test_ignored_layers_keep_blocks() -> None:
    model = _net()
    with torch.no_grad():
        model.blocks[2].fc2.weight.zero_()
        model.blocks[2].fc2.bias.zero_()
    _, plan = graphprune.compact_with_plan(model, X, depth=1, ignored_layers=[model.blocks[2]])
    assert plan.depth[0]["module"] != "blocks.2"


def test_width_and_depth_in_one_call_replay_from_json_and_save_load(tmp_path) -> None:
    model = _net()
    small, plan = graphprune.compact_with_plan(model, X, ratio=0.5, depth=2)
    assert len(plan.depth) == 2 and plan.slices
    again = graphprune.apply_plan(_net(seed=3), graphprune.Plan.from_json(plan.to_json()))
    again.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(again(X), small(X))
    graphprune.save(small, tmp_path, plan)
    loaded = graphprune.load(tmp_path, _net(seed=5), example_input=X)
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))
    assert "blocks removed" in str(plan)


def test_resnet_bottleneck_keeps_its_relu_and_onnxruntime_agrees(tmp_path) -> None:
    from graphprune import zoo

    model, x = zoo.build("resnet50")[:2]
    blocks = graphprune.find_blocks(model, x)
    offered = [b for b in blocks if b.removable]
    assert offered and all(not b.module.endswith(".0") for b in offered)  # first blocks downsample
    target = offered[0].module
    with torch.no_grad():
        bn3 = model.get_submodule(target).bn3
        bn3.weight.zero_()
        bn3.bias.zero_()
        before = model(x)
    small = graphprune.compact(model, x, depth=1)
    replaced = small.get_submodule(target)
    assert isinstance(replaced, nn.Sequential) and isinstance(replaced[0], nn.ReLU)
    with torch.no_grad():
        assert _close(small(x), before)
    result = graphprune.export_onnx(small, x, tmp_path / "small.onnx")  # checks onnxruntime vs torch
    assert result.path.exists()


def _llama(layers: int = 4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_hf_decoder_loses_a_layer_and_stays_its_class_with_cache_config_and_round_trip() -> None:
    model, x = _llama()
    model.config.suppress_ids = [7, 8, 9, 10]  # as long as the layer list, but not per layer
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
        before = model(**x).logits
    small, plan = graphprune.compact_with_plan(model, x, depth=1)
    assert small.config.suppress_ids == [7, 8, 9, 10]
    assert type(small) is type(model) and len(small.model.layers) == 3
    assert [e["module"] for e in plan.depth] == ["model.layers.1"]
    assert small.config.num_hidden_layers == 3 and len(small.config.layer_types) == 3
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    with torch.no_grad():
        assert _close(small(**x).logits, before)
        out = small.generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=3,
                             do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, x["input_ids"], 3))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small.save_pretrained(tmp)
        again = type(small).from_pretrained(tmp).eval()
    with torch.no_grad():
        assert torch.equal(again(**x).logits, small(**x).logits)


def test_hf_attention_sub_layer_alone_becomes_zero_and_generation_still_matches() -> None:
    model, x = _llama(layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # layer 0's attention adds nothing
        before = model(**x).logits
    branches = graphprune.find_blocks(model, x, unit="branch")
    assert sorted(b.module for b in branches if b.removable) == [
        "model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.1.self_attn"]
    small, plan = graphprune.compact_with_plan(model, x, depth=1, depth_unit="branch")
    assert [e["module"] for e in plan.depth] == ["model.layers.0.self_attn"]
    assert type(small.model.layers[0].self_attn).__name__ == "Zero" and len(small.model.layers) == 2
    assert type(small.model.layers[0].input_layernorm).__name__ == "Skip"  # dies with the branch
    with torch.no_grad():
        assert _close(small(**x).logits, before)
        out = small.generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=3,
                             do_sample=False)
    assert torch.equal(out, _greedy_without_cache(small, x["input_ids"], 3))


def test_cli_plan_and_compact_take_depth(tmp_path, capsys) -> None:
    from graphprune.cli.commands import main

    assert main(["plan", "zoo:vit_tiny", "--depth", "1", "--json", str(tmp_path / "p.json")]) == 0
    plan = graphprune.Plan.from_json(tmp_path / "p.json")
    assert len(plan.depth) == 1 and plan.ratio == 0.0
    assert "blocks removed" in capsys.readouterr().out


def test_block_sensitivity_measures_each_block_removed_alone() -> None:
    model = _net()
    with torch.no_grad():
        model.blocks[1].fc2.weight.zero_()
        model.blocks[1].fc2.bias.zero_()
        ref = model(X)

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(X) - ref).abs().max())

    table = graphprune.sensitivity(model, X, error, ratios=(), blocks=True, higher_is_better=False,
                                   progress=False)
    by = {r.module: r for r in table.blocks}
    assert sorted(by) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "extra"]
    assert by["blocks.1"].metric <= 1e-6 and by["blocks.1"].weight_score == 0.0
    assert all(r.metric > 1e-3 for m, r in by.items() if m != "blocks.1")
    assert "blocks.1" in table.to_markdown()


@pytest.mark.slow
def test_width_and_depth_search_reports_every_mix_and_meets_a_flops_budget(request) -> None:
    """Slow (onnxruntime timing of every mix): runs with -m slow or GRAPHPRUNE_SLOW=1."""
    from graphprune.search.mix import search_mix

    if "slow" not in (request.config.getoption("markexpr", "") or "").replace("not slow", "") \
            and not os.environ.get("GRAPHPRUNE_SLOW"):
        pytest.skip("times every mix in onnxruntime: run with -m slow or GRAPHPRUNE_SLOW=1")

    result = search_mix(_net(), X, {"target_flops": 0.6}, depths=(0.0, 0.4), runs=3)
    assert [r.blocks for r in result.rows] == [0, 2] and sum(r.chosen for r in result.rows) == 1
    assert all(r.met and r.flops <= 0.6 * 1.02 for r in result.rows)
    assert "won" in result.plan.notes[-1] and len(result.plan.depth) == result.rows[
        [r.chosen for r in result.rows].index(True)].blocks


class Indexed(nn.Module):
    """Reads its layers by a stored count: deleting one breaks the forward, which must be caught."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 3
        self.layers = nn.ModuleList(Block(6) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            x = self.layers[i](x)
        return x


def test_a_forward_that_breaks_after_the_cut_is_a_clear_error_and_the_model_is_untouched() -> None:
    model = Indexed().eval()
    with pytest.raises(graphprune.GraphPruneError, match="no longer runs"):
        graphprune.compact(model, X, depth=1)
    assert len(model.layers) == 3


class HasOutput(nn.Module):
    def __init__(self, wide: int) -> None:
        super().__init__()
        self.block = Out(wide)  # a named attribute: a cut would make it Skip, which returns h
        self.up = nn.Linear(6, wide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.up(x)), x)


class Out(nn.Module):
    """``x + dense(h)`` with the residual as the *second* input: deleting it would hand on ``h``."""

    def __init__(self, wide: int) -> None:
        super().__init__()
        self.dense = nn.Linear(wide, 6)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense(h)


def test_a_block_whose_first_input_is_not_the_residual_stream_is_refused() -> None:
    blocks = graphprune.find_blocks(HasOutput(wide=12).eval(), X)  # shapes differ: seen at once
    assert len(blocks) == 1 and not blocks[0].removable and "first input" in blocks[0].reason
    with pytest.raises(graphprune.VerificationError):  # same shapes: the reference catches it
        graphprune.compact(HasOutput(wide=6).eval(), X, depth=1)
