"""graph.kernelskip: the eager recording without its heavy kernels must be the same recording.

Oracles: with every estimated op skipped (``MIN_WORK = 0``) the program equals the one recorded
with every kernel run, node for node, strides included, and the skips did happen; a forward that
reads numbers after a skip (``tolist()``) or fails on the zeros is recorded again computing,
with the result the computing recording gives; the work estimates equal the multiply-adds
counted from the ops' output shapes; the program still runs like the model.
"""

from __future__ import annotations

import math
from typing import Any

import fuzzgen
import pytest
import torch
import transformer_models
from torch import nn

from graphprune.graph import eagertrace, fasttrace, kernelskip
from graphprune.graph.copies import eval_copy
from graphprune.graph.inputs import normalize_inputs

F = nn.functional


class Heavy(nn.Module):
    """Every op the recorder may skip, with the views, in-place ops and casts around them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.lin = nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x), inplace=True)  # an in-place op on a skipped output
        h = F.hardswish(self.bn(h.to(memory_format=torch.channels_last)), inplace=True)
        h = self.up(self.dw(h).mul_(2).add_(h[:, :, ::2, ::2]))
        s = self.conv1d(h.flatten(2)[..., :16])  # (B, 6, 16)
        t = self.lin(s.transpose(1, 2))  # (B, 16, 6)
        att = F.scaled_dot_product_attention(t[:, None], t[:, None], t[:, None])[:, 0]
        m = torch.einsum("bij,bkj->bik", t, att) @ t
        m = torch.baddbmm(m, t, att.transpose(1, 2)[..., :6]) + torch.addmm(self.bias, t[0], att[0].T[:, :6])
        return torch.bmm(m, t.transpose(1, 2)).sum(-1) + torch.mm(t[0], t[0].T).sum()


def _program(model: nn.Module, x: Any) -> torch.export.ExportedProgram:
    args, kwargs = normalize_inputs(x)
    return fasttrace.fast_export(eval_copy(model), args, kwargs, recorder="eager")


def _strides(v: torch.Tensor) -> tuple[int, ...]:
    """Strides of the dims longer than 1 (real and meta kernels choose the others differently,
    and no view or layout depends on them)."""
    return tuple(st for st, n in zip(v.stride(), v.shape, strict=True) if n > 1)


def _facts(ep: torch.export.ExportedProgram) -> list[tuple]:
    out = []
    for n in ep.graph.nodes:
        v = n.meta.get("val")
        meta = (tuple(v.shape), _strides(v), str(v.dtype)) if isinstance(v, torch.Tensor) else str(v)
        out.append((n.op, n.name, str(n.target), str(n.args), str(n.kwargs), meta,
                    str(n.meta.get(eagertrace.DEVICE)), str(n.meta.get("nn_module_stack"))))
    return out


class _Counting(kernelskip.Skipping):
    made: list[_Counting] = []

    def __init__(self) -> None:
        super().__init__()
        _Counting.made.append(self)


@pytest.fixture
def skip_all(monkeypatch: pytest.MonkeyPatch) -> list[_Counting]:
    """Every estimated op skipped; the Skipping modes the recorder made, to count their skips."""
    _Counting.made = []
    monkeypatch.setattr(kernelskip, "MIN_WORK", 0.0)
    monkeypatch.setattr(eagertrace, "Skipping", _Counting)
    return _Counting.made


def _computed(model: nn.Module, x: Any, monkeypatch: pytest.MonkeyPatch) -> torch.export.ExportedProgram:
    with monkeypatch.context() as m:
        m.setattr(kernelskip, "MIN_WORK", math.inf)
        return _program(model, x)


CASES = {
    "heavy": lambda: (Heavy(), torch.randn(2, 3, 8, 8)),
    **{f"fuzz{s}": (lambda s=s: fuzzgen.build(fuzzgen.random_spec(s))) for s in (0, 3, 5, 8, 13, 21)},
    **{f"tm_{n}": (lambda n=n: transformer_models.build(n))
       for n in ("hand_attention", "gqa_expand", "mha_cross_kdim_vdim", "tiny_lm_tied")},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_skipping_kernels_records_the_same_program(name: str, skip_all: list[_Counting],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, x = CASES[name]()
    model.eval()
    want = _computed(model, x, monkeypatch)
    got = _program(model, x)
    assert sum(s.skipped for s in skip_all) > 0  # the recording did skip kernels
    assert _facts(got) == _facts(want)
    args, kwargs = normalize_inputs(x)
    torch.testing.assert_close(got.module()(*args, **kwargs), model(*args, **kwargs))


class ReadsNumbers(nn.Module):
    """Branches on numbers read with ``tolist()`` (no op the recorder sees) from a product."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        first = y.abs().sum().tolist()
        return y * 2 if first > 1 else y - 1  # real numbers: > 1; zeros would take the other branch


class FailsOnZeros(nn.Module):
    """Inverts a Gram matrix of a product: singular (an error) when the product is all zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.linalg.inv(h.T @ h + 0.0) @ h.T


@pytest.mark.parametrize("cls", [ReadsNumbers, FailsOnZeros])
def test_a_forward_that_needs_the_numbers_is_recorded_computing(cls: type, skip_all: list[_Counting],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(16, 4 if cls is ReadsNumbers else 8)
    want = _computed(model, x, monkeypatch)
    skip_all.clear()
    got = _program(model, x)
    assert len(skip_all) == 1 and skip_all[0].skipped > 0  # it skipped first, then ran again
    assert _facts(got) == _facts(want)
    torch.testing.assert_close(got.module()(x), model(x))
    if cls is ReadsNumbers:
        assert any(n.target is torch.ops.aten.mul.Tensor for n in got.graph.nodes)


def _macs_from_output(module: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds counted from the output's shape (the definition, not the estimate)."""
    y = module(x)
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return y.numel() * per_output
    if isinstance(module, nn.Linear):
        return y.numel() * module.in_features
    raise TypeError(type(module))


@pytest.mark.parametrize("module,shape", [
    (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 12, 12)),
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 12, 12)),
    (nn.Conv2d(8, 16, 1), (8, 10, 10)),  # unbatched
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 12, 12)),
    (nn.Linear(12, 5), (3, 7, 12)),
])
def test_the_work_estimate_counts_multiply_adds(module: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    if isinstance(module, nn.Conv2d):
        func = torch.ops.aten.conv2d.default
        args: tuple = (x, module.weight, module.bias, list(module.stride), list(module.padding),
                       list(module.dilation), module.groups)
        grouped = module.groups > 1
    else:
        func, args, grouped = torch.ops.aten.linear.default, (x, module.weight, module.bias), False
    want = _macs_from_output(module, x) * (kernelskip.GROUPED_COST if grouped else 1.0)
    assert kernelskip.estimated_work(func, args, {}) == pytest.approx(want)


def test_products_and_attention_estimates() -> None:
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 4)
    aten = torch.ops.aten
    assert kernelskip.estimated_work(aten.bmm.default, (a, b), {}) == 3 * 5 * 7 * 4
    assert kernelskip.estimated_work(aten.einsum.default, ("bij,bjk->bik", [a, b]), {}) == 3 * 5 * 7 * 4
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 11, 8)
    # q @ k^T and (softmax) @ v: two products of 2*4*9*11*8 multiply-adds
    sdpa = aten.scaled_dot_product_attention.default
    assert kernelskip.estimated_work(sdpa, (q, k, k), {}) == 2 * 2 * 4 * 9 * 11 * 8
    assert kernelskip.estimated_work(aten.relu.default, (a,), {}) == 0
    assert not kernelskip.worth_skipping(aten.bmm.default, (a, b), {})  # too small to repay a meta kernel


def test_a_repeated_layer_asks_the_meta_kernel_once(skip_all: list[_Counting],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]).eval()
    x = torch.randn(1, 8, 10, 10)
    want = _computed(model, x, monkeypatch)
    skip_all.clear()
    got = _program(model, x)
    assert skip_all[0].skipped == 3 and len(skip_all[0].metas) == 1
    assert _facts(got) == _facts(want)
    torch.testing.assert_close(got.module()(x), model(x))


class RefusedInPlace(nn.Module):
    """In-place ops the real kernels refuse after a skipped product: a broadcast that grows the
    tensor written, a float written into an integer tensor. The user gets the real error."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.case = case

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.case == "broadcast":
            return h[:1].add_(h)
        return (h > 0).long().add_(h)


@pytest.mark.parametrize("case", ["broadcast", "dtype"])
def test_errors_after_a_skip_are_the_real_errors(case: str, skip_all: list[_Counting],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = RefusedInPlace(case).eval(), torch.randn(3, 4)
    with pytest.raises(RuntimeError) as computing:
        _computed(model, x, monkeypatch)
    with pytest.raises(RuntimeError) as skipping:
        _program(model, x)
    assert str(skipping.value) == str(computing.value)


def test_an_op_without_a_meta_kernel_is_computed(skip_all: list[_Counting],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A meta kernel that raises (none for these arguments) leaves the op computed, not failed."""
    torch.manual_seed(0)
    model, x = Heavy().eval(), torch.randn(2, 3, 8, 8)
    want = _computed(model, x, monkeypatch)
    real = kernelskip._meta

    def no_meta(value: Any) -> Any:
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor) and value[0].dim() == 4:
            raise NotImplementedError("no meta kernel")  # every 4-d (convolution) call
        return real(value)

    monkeypatch.setattr(kernelskip, "_meta", no_meta)
    skip_all.clear()
    got = _program(model, x)
    assert len(skip_all) == 1 and skip_all[0].skipped > 0  # the products were still skipped
    assert _facts(got) == _facts(want)
