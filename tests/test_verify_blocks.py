"""Verification block by block (graphprune/reference/blockwise.py).

Models built from repeated residual blocks are verified piece by piece, each block fed the
reference's own input: a wrong block is named (not just "outputs differ"), the part before the
first block is checked on its own, and models without such blocks keep the whole-model check.
The bugs are injected into correct compact models (a swapped pair of kept columns is what a
slice in the wrong order looks like), and into surgery itself for ``compact``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune
import graphprune.engine as engine
from graphprune.surgery.slicing import set_tensor


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class _Stack(nn.Module):
    """Input projection, four residual blocks in a ModuleList, a head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(4))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _swap_columns(t: torch.Tensor) -> torch.Tensor:
    """The tensor with its first two input columns exchanged: a slice taken in the wrong order."""
    bad = t.detach().clone()
    bad[:, [0, 1]] = bad[:, [1, 0]]
    return bad


def compacted_stack():
    """(model, example input, compact model, plan) of the micro stack at ratio 0.5."""
    torch.manual_seed(0)
    model, x = _Stack().eval(), torch.randn(5, 6)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    assert any(g.removed for g in plan.groups), "nothing pruned: the check would be vacuous"
    return model, x, small, plan


stack = pytest.fixture(scope="module", name="stack")(compacted_stack)


def test_every_block_is_checked_on_the_reference_input(stack) -> None:
    model, x, small, plan = stack
    report = graphprune.verify_model(model, small, x, plan)
    labels = [p.label for p in report.blocks]
    assert labels == ["before blocks.0", "blocks.0", "between blocks.0 and blocks.1", "blocks.1",
                      "between blocks.1 and blocks.2", "blocks.2",
                      "between blocks.2 and blocks.3", "blocks.3"]
    assert all(p.ok for p in report.blocks), report.blocks
    assert report.errors and all(e <= t for e, t in zip(report.errors, report.tolerances))


def test_a_corrupted_block_is_named(stack) -> None:
    model, x, small, plan = stack
    broken = graphprune.apply_plan(model, plan)
    set_tensor(broken, "blocks.2.fc2.weight", _swap_columns(broken.blocks[2].fc2.weight))
    with pytest.raises(graphprune.VerificationError, match=r"block blocks\.2 \(_Block\) is the first block "
                       r"that diverges.*\(2 block\(s\) before it agree\).*ignored_layers=\['blocks\.2'\]"):
        graphprune.verify_model(model, broken, x, plan)


def test_a_corrupted_prefix_is_found_before_the_first_block(stack) -> None:
    model, x, small, plan = stack
    broken = graphprune.apply_plan(model, plan)
    set_tensor(broken, "inp.bias", broken.inp.bias.detach() + 0.5)
    with pytest.raises(graphprune.VerificationError,
                       match=r"entering block blocks\.0 .*before the first block"):
        graphprune.verify_model(model, broken, x, plan)


def test_models_without_repeated_blocks_keep_the_whole_model_check() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 6)
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)
    report = graphprune.verify_model(model, small, x, plan)
    assert report.blocks == [] and report.errors
    broken = graphprune.apply_plan(model, plan)
    set_tensor(broken, "2.weight", _swap_columns(broken[2].weight))
    with pytest.raises(graphprune.VerificationError, match=r"\(output 0: relative error") as info:
        graphprune.verify_model(model, broken, x, plan)
    assert "block by block" not in str(info.value)


@pytest.mark.parametrize("inplace", [False, True])
def test_compact_names_the_block_a_wrong_slice_broke_in_a_llama(monkeypatch, inplace: bool) -> None:
    """A surgery bug in one decoder layer of a small LLaMA: ``compact`` (reference run in verify,
    or before slicing with ``inplace=True``) names that layer."""
    pytest.importorskip("transformers")
    from hf_models import build

    model, x = build("llama")
    sliced = engine.slice_tensors

    def wrong_slice(work, plan, on_slice=None):
        sliced(work, plan, on_slice)
        name = "model.layers.1.mlp.down_proj.weight"
        bad = _swap_columns(work.get_parameter(name))
        set_tensor(work, name, bad)
        if on_slice is not None:
            on_slice(name, bad)

    monkeypatch.setattr(engine, "slice_tensors", wrong_slice)
    with pytest.raises(graphprune.VerificationError, match=r"block model\.layers\.1 \(LlamaDecoderLayer\) "
                       r"is the first block that diverges.*model\.layers\.1\.mlp\.down_proj"):
        graphprune.compact(model, x, 0.4, inplace=inplace)


def test_block_noise_measures_one_blocks_rounding_against_float64() -> None:
    """The second chance for a block is that block's own float32 error (a float64 copy of the
    block, not of the model): tiny for a plain block, large for one that cancels (the
    difference of two nearly equal layers), none for half precision."""
    from graphprune.reference.blockwise import block_noise

    class Cancel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            with torch.no_grad():
                self.b.weight.copy_(self.a.weight * (1 + 1e-4))
                self.b.bias.copy_(self.a.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) - self.b(x)

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    plain, steep = _Block(16).eval(), Cancel()
    with torch.no_grad():
        quiet = block_noise(plain, (x,), {}, plain(x))
        loud = block_noise(steep, (x,), {}, steep(x))
    assert quiet is not None and quiet < 1e-6
    assert loud is not None and loud > 10 * quiet
    half = _Block(16).half()
    assert block_noise(half, (x.half(),), {}, half(x.half())) is None
