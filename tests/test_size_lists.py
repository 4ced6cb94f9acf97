"""Split sizes held as a tuple or list attribute: ``torch.split(x, self.split_sizes)``.

Gated-conv blocks (MambaOut) and inception-style token mixers (InceptionNeXt) keep their split
sizes in one tuple attribute, not in separate integers. The traced graph holds the list the
forward read; after pruning, that attribute must take the new list, or the user's class cannot
run at the new sizes and the whole block is kept (nothing removed). Each micro-model below
reproduces one of the two layouts and is checked by the generic oracles (ratio 0, dead units,
untouched input, fewer params/FLOPs, user's class, onnxruntime).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import OracleSuite
from torch import nn

import graphprune


class GatedConv(nn.Module):
    """Channels-last gated block: fc1 -> split(self.split_indices) -> act(g) * cat(i, dwconv(c))."""

    def __init__(self, dim: int = 12, hidden: int = 16, conv: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(nn.functional.gelu(g) * torch.cat((i, c), dim=-1))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.blocks = nn.Sequential(GatedConv(), GatedConv())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class GatedListNet(GatedNet):
    """The same blocks with the sizes in a list (FocalNet's ``self.input_split = [d, d, k]``)."""

    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks:
            block.split_indices = list(block.split_indices)


class InceptionMixer(nn.Module):
    """split(self.split_indexes) into identity / square / 1xk / kx1 depthwise branches, then cat."""

    def __init__(self, dim: int = 16, gc: int = 4) -> None:
        super().__init__()
        self.dwconv_hw = nn.Conv2d(gc, gc, 3, padding=1, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, 5), padding=(0, 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (5, 1), padding=(2, 0), groups=gc)
        self.split_indexes = (dim - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class InceptionBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.token_mixer = InceptionMixer(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.token_mixer(x)))


class InceptionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(InceptionBlock(), InceptionBlock())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


MODELS = {"gated": GatedNet, "gated_list": GatedListNet, "inception": InceptionNet}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Deterministic weights and BN statistics, without touching the caller's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MODELS[name]()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, 8, 8)
    return model.eval(), x


@pytest.mark.parametrize("name", list(MODELS))
class TestTupleSplitSizes(OracleSuite):
    build = build
    ratio = 0.3

    def test_split_modules_are_pruned_not_kept_whole(self, name: str) -> None:
        c = self.compacted(name)
        assert not [w for w in c.warnings if "kept whole" in w], c.warnings
        for path, mod in c.model.named_modules():
            sizes = getattr(mod, "split_indices", getattr(mod, "split_indexes", None))
            if sizes is None:
                continue
            new = c.small.get_submodule(path)
            new_sizes = getattr(new, "split_indices", getattr(new, "split_indexes", None))
            assert type(new_sizes) is type(sizes), f"{path}: the sizes became {type(new_sizes).__name__}"
            assert sum(new_sizes) < sum(sizes), f"{path}: split sizes {sizes} not reduced ({new_sizes})"

    def test_saved_plan_replays_the_size_tuple(self, name: str) -> None:
        c = self.compacted(name)
        plan = graphprune.Plan.from_json(c.plan.to_json())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = graphprune.apply_plan(c.model, plan)
        with torch.no_grad():
            torch.testing.assert_close(again(c.example_input), c.small(c.example_input))
