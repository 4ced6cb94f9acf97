"""One small model per op family: each rule checked by the oracles, not by eye.

For every model: ratio 0 is bit-identical, removing exactly dead units leaves outputs unchanged,
something is actually removed (or, for models that must stay whole, nothing is).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from oracles import check_dead_channels, check_onnx, check_ratio_zero_identity
from torch import nn

import graphprune


class GroupedConv(nn.Module):
    """ResNeXt-style grouped 3x3 conv between two 1x1 convs: whole groups are removed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.b(F.relu(self.bn(self.g(F.relu(self.a(x))))))


class TransposedUp(nn.Module):
    """ConvTranspose2d (weight is (in, out, k, k)), upsample and a skip concat."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.skip = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(10, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.up(F.relu(self.down(x))), self.skip(x)], 1)
        y = F.interpolate(F.relu(self.mix(y)), scale_factor=2.0, mode="nearest")
        return self.out(F.max_pool2d(y, 2))


class NormsAndActs(nn.Module):
    """GroupNorm (whole groups), InstanceNorm, PReLU per channel, padding, avg pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 12, 1)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.act = nn.PReLU(12)
        self.c3 = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        y = F.pad(F.relu(self.gn(self.c1(x))), (1, 1, 1, 1))
        y = self.act(self.inorm(self.c2(y)))
        return self.c3(F.avg_pool2d(y, 2))


class SplitSlice(nn.Module):
    """Uneven torch.split and a slice of the channel dim, then elementwise products."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 12, 1)
        self.p = nn.Conv2d(4, 8, 1)
        self.q = nn.Conv2d(8, 8, 1)
        self.o = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.c(x), [4, 8], dim=1)
        y = self.p(a) * torch.sigmoid(self.q(b))
        return self.o(y[:, :8])


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y = F.relu(self.c(x))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head((y * s).mean((2, 3)))


class FlattenIntoLinear(nn.Module):
    """Each conv channel maps to its block of H*W features of the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(F.relu(self.bn(self.c(x))), 4)
        return self.out(F.relu(self.fc(y.reshape(y.shape[0], -1))))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 24), nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ClampByTensors(nn.Module):
    """clamp with tensor bounds (clamp.Tensor): scalar buffers, and a per-channel lower bound
    that is sliced with its channel (bounds hold 0, so dead units stay dead)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 24), nn.Linear(24, 6)
        self.register_buffer("lo", -torch.rand(24))
        self.register_buffer("hi", torch.tensor(0.4))
        self.register_buffer("top", torch.tensor(0.3))

    def forward(self, x):
        y = torch.clamp(self.a(x), self.lo, self.hi)
        return self.b(torch.clamp_max(y, self.top) + torch.clamp(y, min=self.lo))


class IndexedBiasAttention(nn.Module):
    """Attention with a per-head bias table read by relative position, ``table[:, idx]``
    (index.Tensor: the head dim is not indexed), and q/k/v interleaved per head."""

    def __init__(self, dim: int = 16, heads: int = 4, key_dim: int = 4, res: int = 3) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, 2 * key_dim
        self.qkv = nn.Linear(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(heads * self.val_dim, dim)
        pos = torch.stack(torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")).flatten(1)
        rel = (pos[:, :, None] - pos[:, None, :]).abs()
        self.table = nn.Parameter(torch.randn(heads, res * res))
        self.register_buffer("idx", rel[0] * res + rel[1])

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1) + self.table[:, self.idx]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.val_dim))


class IndexedBiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 16), IndexedBiasAttention(), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


class CreationOps(nn.Module):
    """Swin-V2-style attention: the key third of the qkv bias zeroed in place (``zero_``), a mask
    made with ``x.new_zeros``, and a tensor made with ``zeros_like(h).fill_``. None of them reads a
    channel's value, so none may keep channels whole."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 4
        self.inp, self.qkv, self.proj = nn.Linear(6, 16), nn.Linear(16, 48), nn.Linear(16, 16)
        self.mid, self.out = nn.Linear(16, 24), nn.Linear(24, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, _ = x.shape
        bias = self.qkv.bias.clone()
        third = bias.numel() // 3
        bias[third : 2 * third].zero_()
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = x.new_zeros((N, N)) - torch.eye(N, device=x.device)
        y = ((q @ k.transpose(-2, -1) + mask).softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
        h = F.relu(self.mid(self.proj(y)))
        return self.out(h + torch.zeros_like(h).fill_(0.5))


class MaxAndPositionTable(nn.Module):
    """Elementwise ``torch.max(a, b)`` of two layers (their channels one unit) and a position
    table looked up with ``index_select`` (its positions whole, its channels the stream's)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.pos = nn.Parameter(torch.randn(9, 12))
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(12, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.inp(x) + self.pos.index_select(0, positions)
        return self.out(torch.max(self.a(h), torch.min(self.b(h), torch.tensor(0.5))))


class ConvWeightView(nn.Module):
    """A depthwise causal convolution run functionally on a view of its module's weight (as
    Mamba's reference path does): the view's channels are the weight's, its taps stay."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.conv = nn.Conv1d(16, 16, 4, groups=16, padding=3)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x).transpose(1, 2)
        w = self.conv.weight
        taps = w.view(w.size(0), w.size(2))
        h = F.conv1d(h, taps.unsqueeze(1), self.conv.bias, padding=taps.shape[1] - 1, groups=h.shape[1])
        return self.out(F.silu(h[..., : x.shape[1]]).transpose(1, 2))


class StandardizedConv(nn.Module):
    """BiT's weight-standardised convolution: the weight is normalised per output channel with
    ``batch_norm(w.reshape(1, out, -1), None, None, training=True)`` before the convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        w = self.b.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-6)
        h = F.conv2d(F.relu(self.a(x)), w.reshape_as(self.b.weight), None, 1, 1)
        return self.c(F.relu(self.bn(h)))


class InterleavedGLU(nn.Module):
    """Gate and up rows interleaved in one projection (gpt-oss): ``h[..., ::2]``, ``h[..., 1::2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.gate_up = nn.Linear(8, 32)
        self.down = nn.Linear(16, 3)

    def forward(self, x):
        h = self.gate_up(self.inp(x))
        return self.down(F.silu(h[..., ::2]) * (h[..., 1::2] + 1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "grouped_conv": (GroupedConv, (2, 3, 8, 8)),
    "transposed_up": (TransposedUp, (2, 3, 8, 8)),
    "norms_acts": (NormsAndActs, (2, 3, 10, 10)),
    "split_slice": (SplitSlice, (2, 3, 6, 6)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 8, 8)),
    "flatten_linear": (FlattenIntoLinear, (2, 3, 8, 8)),
    "swiglu": (SwiGLU, (2, 5, 8)),
    "clamp_tensor": (ClampByTensors, (2, 5, 8)),
    "indexed_bias": (IndexedBiasNet, (2, 9, 6)),
    "creation_ops": (CreationOps, (2, 5, 6)),
    "max_and_position_table": (MaxAndPositionTable, (2, 7, 6)),
    "conv_weight_view": (ConvWeightView, (2, 7, 6)),
    "standardized_conv": (StandardizedConv, (2, 3, 8, 8)),
    "interleaved_glu": (InterleavedGLU, (2, 5, 6)),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rule_family_passes_the_oracles(name: str) -> None:
    model, x = _build(name)
    check_ratio_zero_identity(model, x)
    small = check_dead_channels(model, x, 0.5)
    assert small(x).shape == model(x).shape


def test_clamp_with_tensor_bounds_is_pruned_and_runs_in_onnxruntime() -> None:
    model, x = _build("clamp_tensor")
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert not plan.boundaries, plan.boundaries
    assert small.a.out_features == 12 and small.lo.shape == (12,)
    check_onnx(small, x)


def test_bias_table_indexed_by_position_is_pruned_with_its_heads() -> None:
    model, x = _build("indexed_bias")
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert small.attn.heads == 2 and small.attn.table.shape == (2, 9), plan.groups
    assert small.attn.qkv.out_features == 2 * 16
    check_onnx(small, x)


def test_grouped_conv_loses_whole_groups() -> None:
    model, x = _build("grouped_conv")
    small = graphprune.compact(model, x, 0.5)
    assert small.g.groups == 2 and small.g.in_channels == 8 and small.g.out_channels == 16


def test_groupnorm_keeps_group_width() -> None:
    model, x = _build("norms_acts")
    small = graphprune.compact(model, x, 0.5)
    assert small.gn.num_channels // small.gn.num_groups == 4
    assert small.act.num_parameters == small.c2.out_channels


def test_flatten_into_linear_removes_blocks_of_features() -> None:
    model, x = _build("flatten_linear")
    small = graphprune.compact(model, x, 0.5)
    assert small.c.out_channels == 4 and small.fc.in_features == 4 * 16


class BiasedAttention(nn.Module):
    """SDPA with a learned per-head additive bias (Swin's relative position bias) as attn_mask."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


def test_per_head_attention_bias_is_removed_with_its_head() -> None:
    # Regression (found by verify on Swin): the bias passed as attn_mask formed a group of its
    # own, so head 1 and bias column 0 could be removed; verify=True must now pass.
    torch.manual_seed(0)
    model, x = BiasedAttention().eval(), torch.randn(2, 5, 16)
    plan = graphprune.make_plan(model, x, 0.5)
    small = graphprune.compact(model, x, 0.5)  # verify=True compares with the plan's reference
    assert small.bias.shape[0] == small.heads == 2
    kept = plan.slices["bias"][0]
    assert plan.slices["qkv.weight"][0][: len(kept) * 4] == [h * 4 + i for h in kept for i in range(4)]


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))  # the line a crashing relu rule must point at


def test_a_crashing_rule_freezes_and_names_the_users_line(monkeypatch) -> None:
    from graphprune.graph.rules import registry

    def broken(ctx, node):
        raise ValueError("rule bug")

    for op in registry.ops("relu.default"):
        monkeypatch.setitem(registry._RULES, op, broken)
    analysis = graphprune.analyze(_ReluNet().eval(), torch.randn(2, 4))
    reasons = [b for b in analysis.boundaries if "rule bug" in b]
    assert reasons, analysis.boundaries
    assert "test_rules.py:" in reasons[0] and "the line a crashing relu rule must point at" in reasons[0]


def test_creation_and_in_place_fills_let_channels_through() -> None:
    model, x = _build("creation_ops")
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert not plan.boundaries, plan.boundaries
    assert small.qkv.out_features < 48 and small.heads < 4, "the zeroed bias kept the heads whole"
    assert small.mid.out_features < 24, "zeros_like / fill_ kept mid's channels whole"
    check_onnx(small, x)


def test_elementwise_max_and_index_select_have_rules() -> None:
    model, x = _build("max_and_position_table")
    small, plan = graphprune.compact_with_plan(model, x, 0.5, prune_hidden=True)
    assert not plan.boundaries, plan.boundaries
    assert small.a.out_features == small.b.out_features == 8  # one unit per max'd channel pair
    assert small.pos.shape == (9, 6)  # every position stays; the stream's channels go


def test_convolution_of_a_weight_view_prunes_channels_not_taps() -> None:
    model, x = _build("conv_weight_view")
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert small.conv.weight.shape == (8, 1, 4), small.conv.weight.shape
    assert small.inp.out_features == 8 and small.conv.bias.shape == (8,)


def test_standardized_weights_prune_output_channels_and_keep_the_normalised_ones() -> None:
    """Rows of a standardised weight are the parameter's rows (exact); its input channels are
    what each row's statistic is taken over, so they stay without prune_hidden."""
    model, x = _build("standardized_conv")
    small = graphprune.compact(model, x, 0.5, round_to=1)
    assert small.b.weight.shape == (6, 16, 3, 3)
    assert small.a.out_channels == 16


class _BatchStatsOverFeatures(nn.Module):
    """Training-mode batch norm of (B, N, C) features: statistics per token over the features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.batch_norm(self.fc(x), None, None, training=True))


def test_statistics_from_the_input_keep_the_channels_they_reduce_over() -> None:
    torch.manual_seed(0)
    model, x = _BatchStatsOverFeatures().eval(), torch.randn(2, 5, 6)
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert small.fc.out_features == 16
    assert any("computes statistics over these channels" in (g.reason or "") for g in plan.groups)


@torch.library.custom_op("graphprune_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _double_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(_double(self.a(x)))


def test_a_custom_op_is_a_boundary_that_says_what_it_is() -> None:
    torch.manual_seed(0)
    model, x = _CustomOpNet().eval(), torch.randn(2, 4)
    small, plan = graphprune.compact_with_plan(model, x, 0.5)
    assert small.a.out_features == 8  # opaque: its channels stay
    assert any("custom op of the 'graphprune_test' library" in b for b in plan.boundaries), plan.boundaries
    torch.testing.assert_close(small(x), model(x))


def test_interleaved_gate_and_up_rows_lose_whole_pairs() -> None:
    model, x = _build("interleaved_glu")
    small, plan = graphprune.compact_with_plan(model, x, 0.5, round_to=1)
    assert small.gate_up.out_features == 16 and small.down.in_features == 8
    rows = plan.slices["gate_up.weight"][0]
    assert all(rows[2 * i] % 2 == 0 and rows[2 * i + 1] == rows[2 * i] + 1 for i in range(8)), rows
