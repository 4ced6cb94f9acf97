"""Anything users throw at compact(): each case has a defined outcome.

Either it works -- the result is checked against the plan's reference (``verify_model``,
independent of surgery) and the input model is bit-identical afterwards -- or it raises a
graphprune error that says what to do. Never a silent wrong model, never a modified input.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_untouched, compare_outputs, snapshot
from torch import nn

import graphprune
from graphprune.graph.inputs import flatten_outputs, run_model


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    return flatten_outputs(run_model(model, x))


def _compact_checked(model: nn.Module, x, ratio: float = 0.5, **kwargs):
    """compact_with_plan + untouched input + an exact, passing reference check. Returns (small, plan)."""
    before = snapshot(model)
    small, plan = graphprune.compact_with_plan(model, x, ratio=ratio, **kwargs)
    assert_untouched(model, before)
    report = graphprune.verify_model(model, small, x, plan, prune_hidden=kwargs.get("prune_hidden", False))
    assert report.exact, report.skipped
    assert all(e <= t for e, t in zip(report.errors, report.tolerances)), report
    return small, plan


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(torch.relu(y).mean((2, 3)))


def _img() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


# ------------------------------------------------------------------------------------------
# Modes, dtypes, devices
# ------------------------------------------------------------------------------------------


def test_train_mode_is_preserved_per_module() -> None:
    """A training model with a frozen (eval-mode) BatchNorm comes back exactly like that."""
    model = ConvNet().train()
    model.bn.eval()
    small = graphprune.compact(model, _img(), ratio=0.5)
    assert small.conv1.out_channels == 4
    assert {n: m.training for n, m in small.named_modules()} == {
        n: m.training for n, m in model.named_modules()
    }
    assert model.training and not model.bn.training


def test_eval_mode_is_preserved() -> None:
    small = graphprune.compact(ConvNet().eval(), _img(), ratio=0.5)
    assert not any(m.training for m in small.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_stay_in_their_dtype(dtype: torch.dtype) -> None:
    model, x = ConvNet().eval().to(dtype), _img().to(dtype)
    small, _ = _compact_checked(model, x)
    assert {p.dtype for p in small.parameters()} == {dtype}
    assert _outputs(small, x)[0].dtype == dtype


def test_meta_model_gets_a_plan_and_a_meta_compact_model() -> None:
    """No weights on meta: analysis, plan and surgery work; numerics are skipped (and say so)."""
    with torch.device("meta"):
        model = ConvNet()
    x = torch.randn(2, 3, 8, 8, device="meta")
    plan = graphprune.make_plan(model, x, ratio=0.5)
    assert plan.slices["conv1.weight"][0] and len(plan.slices["conv1.weight"][0]) == 4
    small = graphprune.compact(model, x, ratio=0.5)
    assert small.conv1.weight.is_meta and small.conv1.weight.shape == (4, 3, 3, 3)
    assert _outputs(small, x)[0].shape == (2, 4)
    report = graphprune.verify_model(model, small, x, plan)
    assert not report.exact and "meta" in report.skipped


def test_plan_made_on_meta_replays_on_a_real_model() -> None:
    """Plan on meta (e.g. a model too big to materialise), weights later: shapes agree."""
    with torch.device("meta"):
        meta = ConvNet()
    plan = graphprune.make_plan(meta, torch.randn(2, 3, 8, 8, device="meta"), ratio=0.5)
    small = graphprune.apply_plan(ConvNet().eval(), plan)
    assert small.conv1.weight.shape == (4, 3, 3, 3) and small.fc.in_features == 3
    assert _outputs(small, _img())[0].shape == (2, 4)


# ------------------------------------------------------------------------------------------
# Parameters: tied, shared, outside modules
# ------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.proj(F.gelu(self.fc(h)))
        return self.lm_head(h)


def test_tied_parameters_stay_tied() -> None:
    model, ids = TiedLM().eval(), torch.randint(0, 20, (2, 5))
    small, _ = _compact_checked(model, ids)
    assert small.fc.out_features == 8
    assert small.lm_head.weight is small.embed.weight


class TwiceCalled(nn.Module):
    """One conv applied twice (weight sharing): its input and output channels become one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.shared(y))
        y = torch.relu(self.shared(y))
        return self.head(y)


def test_module_called_twice_is_pruned_consistently() -> None:
    small, _ = _compact_checked(TwiceCalled().eval(), _img())
    assert small.shared.in_channels == small.shared.out_channels == small.stem.out_channels == 4


class FreeParameters(nn.Module):
    """nn.Parameters and buffers used directly in forward: class token, position embedding, scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))
        self.fc1 = nn.Linear(16, 12)
        self.gain = nn.Parameter(torch.rand(12) + 0.5)
        self.register_buffer("shift", torch.randn(12))
        self.fc2 = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = h + self.fc2(torch.relu(self.fc1(h) * self.gain + self.shift))
        return self.head(h[:, 0])


def test_parameters_and_buffers_used_outside_modules_are_sliced_with_their_channels() -> None:
    small, plan = _compact_checked(FreeParameters().eval(), torch.randn(2, 4, 6), prune_hidden=True)
    assert small.fc1.out_features == small.gain.shape[0] == small.shift.shape[0] == 6
    assert small.cls_token.shape[-1] == small.pos_embed.shape[-1] == small.embed.out_features == 8


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        z = self.conv2(y)
        z += y
        z.mul_(0.5)
        return self.conv3(F.relu_(z))


def test_in_place_ops() -> None:
    small, _ = _compact_checked(InPlace().eval(), _img())
    assert small.conv1.out_channels == 4


# ------------------------------------------------------------------------------------------
# Inputs and outputs
# ------------------------------------------------------------------------------------------


class KwargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.fc1(x)) * scale
        if mask is not None:
            h = h * mask[..., None]
        return self.fc2(h)


def test_dict_of_keyword_inputs() -> None:
    x = {"x": torch.randn(2, 5, 6), "mask": torch.ones(2, 5), "scale": 2.0}
    small, _ = _compact_checked(KwargsNet().eval(), x)
    assert small.fc1.out_features == 8
    compare_outputs(_outputs(small, x), _outputs(small, {**x, "scale": 2.0}), 0.0, "rerun")


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    features: torch.Tensor


class MultiIO(nn.Module):
    """Two positional inputs; returns a dict holding a dataclass and a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Linear(5, 8)
        self.mix = nn.Linear(8, 12)
        self.out1 = nn.Linear(12, 4)
        self.out2 = nn.Linear(12, 2)

    def forward(self, image: torch.Tensor, vec: torch.Tensor) -> dict:
        h = torch.relu(self.mix(self.a(image).mean((2, 3)) + self.b(vec)))
        return {"result": Result(self.out1(h), h.sum(-1)), "extra": (self.out2(h), 2 * h.sum(-1))}


def test_multiple_inputs_and_structured_outputs() -> None:
    model = MultiIO().eval()
    x = (_img(), torch.randn(2, 5))
    small, _ = _compact_checked(model, x)
    assert small.mix.out_features == 6 and small.a.out_channels == 4
    out = run_model(small, x)
    assert isinstance(out, dict) and isinstance(out["result"], Result) and isinstance(out["extra"], tuple)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        steps = int(h.abs().max().item() * 3) + 1  # a Python int from a tensor value
        for _ in range(steps):
            h = torch.tanh(h)
        return self.out(h)


def test_data_dependent_control_flow_is_a_clear_error() -> None:
    model = DataDependent().eval()
    before = snapshot(model)
    with pytest.raises(graphprune.TraceError) as info:
        graphprune.compact(model, torch.randn(3, 4), ratio=0.5)
    msg = str(info.value)
    assert "test_robustness.py" in msg and "torch.cond" in msg, msg
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------------
# Unknown ops, custom functions
# ------------------------------------------------------------------------------------------


class ClampSTE(torch.autograd.Function):
    """A custom autograd function (straight-through clamp)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Exotic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.c3 = nn.Conv2d(2, 4, 1)
        self.c4 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ClampSTE.apply(self.c1(x))
        z = F.pixel_shuffle(self.c2(x), 2)  # no rule: a boundary
        return self.c3(z).mean((2, 3)) + self.c4(y).mean((2, 3))


def test_ops_without_a_rule_freeze_their_channels_and_are_reported() -> None:
    small, plan = _compact_checked(Exotic().eval(), _img())
    assert any("pixel_shuffle" in b for b in plan.boundaries), plan.boundaries
    assert small.c2.out_channels == 8, "channels through an op without a rule must stay"
    assert "pixel_shuffle" in str(plan)
    assert small.c1.out_channels == 4, "the custom autograd function traces to clamp: prunable"


@torch.library.custom_op("graphprune_test::softsign_scale", mutates_args=())
def softsign_scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """A user's custom op: torch.export keeps it as one opaque node, graphprune has no rule."""
    return x / (1 + x.abs()) * s


@softsign_scale.register_fake
def _(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(softsign_scale(self.b(torch.relu(self.a(x))), 2.0))


def test_custom_op_is_a_reported_boundary() -> None:
    small, plan = _compact_checked(CustomOpNet().eval(), _img())
    assert any("softsign_scale" in b for b in plan.boundaries), plan.boundaries
    assert small.b.out_channels == 8, "channels into an opaque op must stay"
    assert small.a.out_channels == 4, "channels elsewhere are still pruned"


# ------------------------------------------------------------------------------------------
# Degenerate ratios and models
# ------------------------------------------------------------------------------------------


def test_nothing_prunable_returns_an_equal_copy_and_says_why() -> None:
    model, x = nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(2, 4)
    small, plan = _compact_checked(model, x)
    assert small is not model and small[0].weight is not model[0].weight
    compare_outputs(_outputs(small, x), _outputs(model, x), 0.0, "nothing prunable")
    assert not plan.slices and not any(g.removed for g in plan.groups)
    text = str(plan)
    assert "0 groups pruned" in text and "model output" in text, text


class HeadsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 4
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.fc((x + self.proj(y)).mean(1))


@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_huge_ratio_keeps_at_least_one_unit_per_group(ratio: float) -> None:
    small, _ = _compact_checked(ConvNet().eval(), _img(), ratio=ratio, round_to=1)  # exact counts
    assert small.conv1.out_channels == 1 and small.conv2.out_channels == 1
    heads, _ = _compact_checked(HeadsNet().eval(), torch.randn(2, 5, 16), ratio=ratio)
    assert heads.num_heads == 1 and heads.qkv.out_features == 3 * heads.head_dim


class L2Normalized(nn.Module):
    """Features divided by their L2 norm (torch.linalg.vector_norm / torch.norm take dim third)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)) + torch.norm(h, 2, 1, True)


def test_norm_over_features_is_kept_whole_by_default_and_pruned_with_prune_hidden() -> None:
    model, x = L2Normalized().eval(), torch.randn(3, 4)
    assert _compact_checked(model, x)[0].a.out_features == 8
    assert _compact_checked(model, x, prune_hidden=True)[0].a.out_features == 4


class _PoolsTooFar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3)
        self.pool = nn.AvgPool3d((2, 7, 7))

    def forward(self, x):
        return self.pool(self.conv(x))


def test_an_input_the_model_rejects_is_one_clear_error_without_torch_tracebacks(caplog) -> None:
    """A pooling window larger than the input fails in the meta kernel too (avg_pool3d's is in
    Python); fake tensors log that at ERROR level with a full traceback unless silenced."""
    rejected = pytest.raises(graphprune.InputError, match="rejected the example input")
    with caplog.at_level(logging.DEBUG), rejected:
        graphprune.compact(_PoolsTooFar().eval(), torch.randn(1, 3, 3, 5, 5), ratio=0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:300] for r in errors]


class _SplitByCount(nn.Module):
    """Rows split by a count read from the values (JetMoE's tokens per expert): the split sizes
    are symbols only known at run time in torch.export's graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        n = (h[:, 0] > 0).sum().item()
        torch._check(n >= 0)
        torch._check(n <= h.shape[0])
        first, rest = h.split([n, h.shape[0] - n])
        return self.out(torch.cat([first * 2, rest]))


def test_split_sizes_known_only_at_run_time_do_not_crash_compact() -> None:
    torch.manual_seed(0)
    model, x = _SplitByCount().eval(), torch.randn(6, 4)
    with pytest.warns(UserWarning, match="nothing was removed"):
        small = graphprune.compact(model, x, ratio=0.5)
    torch.testing.assert_close(small(x), model(x))
