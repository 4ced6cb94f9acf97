"""reconstruct=True: calibrated selection and least-squares refit, checked against oracles.

* ratio 0 changes nothing (bit for bit, BatchNorm re-estimation included: nothing was removed);
* removing units that are exactly dead leaves the outputs unchanged (selection must find them,
  the refit must be a no-op up to the ridge);
* a consumer whose removed inputs are exact linear combinations of kept ones (and of the constant)
  is reconstructed exactly: Linear, kxk Conv, and an LSTM's input weights (first and second layer);
* the refit never makes the calibration error worse than keeping the same units without it;
* onnxruntime agrees with torch, save/load replays the added biases, the user's model is untouched;
* bad calibration data is refused before any work with an InputError that says what to pass.
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch
from oracles import assert_same_outputs, assert_untouched, check_onnx, make_dead, relative_error, snapshot
from torch import nn

import graphprune
from graphprune import ReconstructOptions, SecondMoments
from graphprune.errors import InputError

EXACT = ReconstructOptions(ridge=1e-10, batchnorm=False)


def _rel(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return relative_error(a(x), b(x))


class ConvNet(nn.Module):
    """conv-BN-ReLU x2 (no conv bias: compensation must add one), pooled into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _convnet() -> ConvNet:
    torch.manual_seed(0)
    m = ConvNet()
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


class Branches(nn.Module):
    """Two groups read by one consumer (concat): the second group's refit must keep the first
    group's removed columns dead."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], -1)))


def _mlp(seed: int, widths: tuple[int, ...] = (6, 16, 12, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


# ------------------------------------------------------------------------------------------
# Exact reconstruction
# ------------------------------------------------------------------------------------------


def test_linear_consumer_of_linear_combinations_is_reconstructed_exactly() -> None:
    # hidden = W1 x + b1 has rank 4 + constant: any 4 kept hidden units span the removed ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3, bias=False)).eval()
    calib = [torch.randn(64, 4) for _ in range(3)]
    x = torch.randn(100, 4)
    small, plan = graphprune.compact_with_plan(model, x[:8], 0.5, data=calib, reconstruct=EXACT)
    assert small[0].out_features == 4
    assert _rel(small, model, x) < 1e-5
    assert plan.biases == ["1"]  # the bias-free consumer got one (its removed units' mean went there)
    assert _rel(graphprune.compact(model, x[:8], 0.5), model, x) > 1e-2  # without: far off


@pytest.mark.parametrize("dims", [1, 2])
def test_kxk_conv_consumer_is_reconstructed_exactly(dims: int) -> None:
    # 1x1 conv of 3 channels -> 8 channels of rank 3 + constant; an unpadded, strided, dilated
    # kxk conv reads them (reflect padding would read the same kept values: also exact)
    torch.manual_seed(0)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    model = nn.Sequential(conv(3, 8, 1), conv(8, 4, 3, stride=2, dilation=2, padding=1,
                                                 padding_mode="reflect")).eval()
    shape = (3, 9) if dims == 1 else (3, 9, 9)
    calib = [torch.randn(16, *shape) for _ in range(2)]
    x = torch.randn(20, *shape)
    small = graphprune.compact(model, x[:2], 0.5, data=calib, reconstruct=EXACT)
    assert small[0].out_channels == 4
    assert _rel(small, model, x) < 1e-5


class RecurrentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.lin(x))
        return self.head(out[:, -1])


def test_lstm_input_weights_are_reconstructed_exactly() -> None:
    torch.manual_seed(0)
    model = RecurrentNet().eval()
    calib = [torch.randn(16, 5, 3) for _ in range(3)]
    x = torch.randn(30, 5, 3)
    small, plan = graphprune.compact_with_plan(
        model, x[:4], 0.0, ratios={"lin": 0.5}, data=calib, reconstruct=EXACT
    )
    assert small.lstm.input_size == 4
    assert _rel(small, model, x) < 1e-5
    # hidden units: the second layer's input weights (inside the module) and the head are refit
    _, plan = graphprune.compact_with_plan(model, x[:4], 0.5, data=calib, reconstruct=EXACT)
    assert "refit" in " ".join(plan.notes) and plan.importance == "obs"


# ------------------------------------------------------------------------------------------
# Identity and dead units
# ------------------------------------------------------------------------------------------


def test_ratio_zero_with_reconstruct_changes_nothing() -> None:
    model = _convnet()
    x = torch.randn(4, 3, 6, 6)
    calib = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    small = graphprune.compact(model, x, 0.0, data=calib, reconstruct=True)
    assert_same_outputs(small, model, x, rtol=0.0, what="ratio 0 with reconstruct")
    assert graphprune.count_params(small) == graphprune.count_params(model)


@pytest.mark.parametrize("build", ["mlp", "branches", "convnet"])
def test_removing_dead_units_leaves_outputs_unchanged(build: str) -> None:
    if build in ("mlp", "branches"):
        torch.manual_seed(0)
        model, x = (_mlp(1) if build == "mlp" else Branches().eval()), torch.randn(8, 6)
        calib = [torch.randn(64, 6) for _ in range(2)]
    else:
        model, x = _convnet(), torch.randn(4, 3, 6, 6)
        calib = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    dead = make_dead(model, x, 0.5, seed=3)
    before = snapshot(dead.model)
    small = graphprune.compact(dead.model, x, 0.5, data=calib, reconstruct=EXACT)
    assert_untouched(dead.model, before)
    assert graphprune.count_params(small) < graphprune.count_params(dead.model)
    assert_same_outputs(small, dead.model, x, rtol=1e-5, what="dead units removed with reconstruct")


# ------------------------------------------------------------------------------------------
# Never worse than no reconstruction; attention output projection
# ------------------------------------------------------------------------------------------


def _calib_error(small: nn.Module, model: nn.Module, calib: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((small(c) - model(c)).pow(2).mean()) for c in calib)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_never_worse_than_the_same_units_without_it(seed: int) -> None:
    # groups read by the output layer only (one, or two through a concat): least squares on
    # the model's own output, so the refit can only lower the error on the calibration data
    torch.manual_seed(seed)
    model = _mlp(seed, (6, 24, 4)) if seed < 2 else Branches().eval()
    calib = [torch.randn(64, 6) for _ in range(3)]
    x = calib[0][:8]
    plain = graphprune.compact(model, x, 0.5)
    refit = graphprune.compact(model, x, 0.5, data=calib, reconstruct=ReconstructOptions(selection="plan"))
    chosen = graphprune.compact(model, x, 0.5, data=calib, reconstruct=True)
    assert _calib_error(refit, model, calib) < 0.99 * _calib_error(plain, model, calib)
    assert _calib_error(chosen, model, calib) <= _calib_error(refit, model, calib) * 1.05 + 1e-9


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_attention_output_projection_refit_after_head_removal() -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    calib = [torch.randn(8, 5, 16) for _ in range(3)]
    x = calib[0][:2]
    plain = graphprune.compact(model, x, 0.5)
    refit = graphprune.compact(model, x, 0.5, data=calib, reconstruct=ReconstructOptions(selection="plan"))
    assert plain.heads == refit.heads == 2
    assert _calib_error(refit, model, calib) < 0.9 * _calib_error(plain, model, calib)


# ------------------------------------------------------------------------------------------
# Export, save/load, plan-only, statistics
# ------------------------------------------------------------------------------------------


def test_onnx_and_save_load_keep_the_added_biases() -> None:
    model = _convnet()
    x = torch.randn(4, 3, 6, 6)
    calib = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    before = snapshot(model)
    small, plan = graphprune.compact_with_plan(model, x, 0.5, data=calib, reconstruct=True)
    assert_untouched(model, before)
    assert small.c2.bias is not None and model.c2.bias is None
    check_onnx(small, x)
    with tempfile.TemporaryDirectory() as tmp:
        graphprune.save(small, tmp, plan)
        again = graphprune.load(tmp, ConvNet().eval())
    assert_same_outputs(again, small, x, rtol=0.0, what="load(save(reconstructed))")
    replayed = graphprune.apply_plan(ConvNet().eval(), graphprune.Plan.from_json(plan.to_json()))
    assert replayed.c2.bias is not None and replayed(x).shape == small(x).shape


def test_make_plan_chooses_units_by_reconstruction() -> None:
    model = _mlp(0)
    calib = [torch.randn(64, 6) for _ in range(2)]
    plan = graphprune.make_plan(model, calib[0][:4], 0.5, data=calib, reconstruct=True)
    plain = graphprune.make_plan(model, calib[0][:4], 0.5)
    assert plan.importance == "obs" and [len(g.removed) for g in plan.groups] == [
        len(g.removed) for g in plain.groups
    ]


def test_the_plan_of_a_reconstruction_depends_on_its_inputs_only(monkeypatch) -> None:
    # the same call twice, on a clock that runs at another speed each time, must write the same
    # plan: distributed ranks compare plans, and a saved plan is a reproducible record
    import graphprune.reconstruct.run as run

    ticks = iter(float(i * i) for i in range(1000))
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(ticks))
    model = _mlp(0)
    calib = [torch.randn(64, 6) for _ in range(2)]
    first = graphprune.make_plan(model, calib[0][:4], 0.5, data=calib, reconstruct=True)
    second = graphprune.make_plan(model, calib[0][:4], 0.5, data=calib, reconstruct=True)
    assert any(n.startswith("reconstruct:") for n in first.notes)
    assert first.reconstruction.seconds != second.reconstruction.seconds  # the clock did differ
    assert first.to_json() == second.to_json()


def test_second_moments_are_sums_that_merge_exactly() -> None:
    x, y = torch.randn(50, 3), torch.randn(50, 2)
    whole, a, b = SecondMoments(), SecondMoments(), SecondMoments()
    whole.add("k", x, y)
    a.add("k", x[:20], y[:20])
    b.add("k", x[20:], y[20:])
    a.merge(b)
    assert a["k"].n == 50
    torch.testing.assert_close(a["k"].gram, whole["k"].gram)
    torch.testing.assert_close(a["k"].cross, (x.double().T @ y.double()) / 50)
    d = SecondMoments()
    d.add("bn", x, diagonal=True)
    torch.testing.assert_close(d["bn"].cross, x.double().mean(0))


def test_batchnorm_statistics_are_reestimated_on_the_calibration_data() -> None:
    model = _convnet()
    x = torch.randn(4, 3, 6, 6)
    batch = torch.randn(32, 3, 6, 6)
    small = graphprune.compact(model, x, 0.5, data=[batch], reconstruct=True)
    ref = copy.deepcopy(small).train()  # independent: torch's own BN statistics of one batch
    for bn in (ref.b1, ref.b2):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        ref(batch)
    for mine, theirs in ((small.b1, ref.b1), (small.b2, ref.b2)):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, match",
    [
        (None, "needs calibration data"),
        (iter([torch.randn(4, 6)]), "re-iterable"),
        ([], "no batches"),
        ([torch.randn(4, 7)], "fails on the first calibration batch"),
        ([torch.randn(4, 6, 1)], "does not match"),
        ([((torch.randn(4, 6), torch.randn(4, 6)), None)], "structure"),
        ([torch.full((4, 6), float("nan"))], "NaN"),
        (torch.randn(4, 6), "iterable of batches"),
    ],
)
def test_bad_calibration_data_is_refused_before_any_work(data, match: str) -> None:
    # before any work: the structure is checked first, the model runs on the first batch before
    # any statistic is taken, and the user's model is untouched either way
    model = _mlp(0)
    before = snapshot(model)
    with pytest.raises(InputError, match=match):
        graphprune.compact(model, torch.randn(2, 6), 0.5, data=data, reconstruct=True)
    assert_untouched(model, before)


def test_bad_reconstruct_value_is_refused() -> None:
    with pytest.raises(InputError, match="reconstruct must be"):
        graphprune.compact(_mlp(0), torch.randn(2, 6), 0.5, data=[torch.randn(4, 6)], reconstruct="yes")
    with pytest.raises(InputError, match="ridge"):
        graphprune.compact(_mlp(0), torch.randn(2, 6), 0.5, data=[torch.randn(4, 6)],
                           reconstruct=ReconstructOptions(ridge=-1.0))


def test_bare_inputs_and_input_target_pairs_agree() -> None:
    # reconstruction needs no labels: (inputs, target) pairs give exactly what bare inputs give
    model = _mlp(0)
    calib = [torch.randn(32, 6) for _ in range(2)]
    a = graphprune.compact(model, calib[0][:4], 0.5, data=calib, reconstruct=True)
    b = graphprune.compact(model, calib[0][:4], 0.5, data=[(c, np.zeros(1)) for c in calib], reconstruct=True)
    assert_same_outputs(a, b, calib[1], rtol=0.0, what="inputs vs (inputs, target) pairs")


def test_cli_calib_and_reconstruct(tmp_path, capsys) -> None:
    from graphprune.cli import commands as cli

    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(64, 64), calib)
    assert cli.main(["compact", "zoo:mlp", "--ratio", "0.5", "--calib", str(calib), "--reconstruct"]) == 0
    assert "importance=obs" in capsys.readouterr().out
    assert cli.main(["compact", "zoo:mlp", "--reconstruct"]) == 2
    assert "--calib" in capsys.readouterr().err
    # --calib alone means what data= alone means in the API: reconstruction
    assert cli.main(["compact", "zoo:mlp", "--ratio", "0.5", "--calib", str(calib)]) == 0
    assert "importance=obs" in capsys.readouterr().out
    named = ["compact", "zoo:mlp", "--ratio", "0.5", "--calib", str(calib), "--importance", "l2"]
    assert cli.main(named) == 0
    assert "importance=l2" in capsys.readouterr().out


def test_target_search_and_pruner_reconstruct_too() -> None:
    model = _mlp(0, (6, 32, 32, 4))
    calib = [torch.randn(64, 6) for _ in range(2)]
    x = calib[0][:4]
    plain = graphprune.compact(model, x, target_params=0.5)
    rec = graphprune.compact(model, x, target_params=0.5, data=calib, reconstruct=True)
    assert [m.out_features for m in rec if isinstance(m, nn.Linear)] == [
        m.out_features for m in plain if isinstance(m, nn.Linear)
    ]
    assert _calib_error(rec, model, calib) < _calib_error(plain, model, calib)
    pruner = graphprune.Pruner(model, x, 0.5, steps=2, data=calib, reconstruct=True)
    small = pruner.run()
    assert [m.out_features for m in small if isinstance(m, nn.Linear)][:2] == [16, 16]
    assert _calib_error(small, model, calib) < _calib_error(graphprune.compact(model, x, 0.5), model, calib)


def test_data_without_a_criterion_means_reconstruct() -> None:
    model = _mlp(0)
    calib = [torch.randn(64, 6) for _ in range(2)]
    x = calib[0][:4]
    _, auto = graphprune.compact_with_plan(model, x, 0.5, data=calib)
    _, named = graphprune.compact_with_plan(model, x, 0.5, data=calib, importance="l2")
    _, off = graphprune.compact_with_plan(model, x, 0.5, data=calib, reconstruct=False)
    assert (auto.importance, named.importance, off.importance) == ("obs", "l2", "l2")


class FunctionalConsumer(nn.Module):
    """fc2's weights are used functionally: its module never runs, so no hook sees its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(self.fc1(x)), self.fc2.weight, self.fc2.bias)


def test_consumer_that_never_runs_as_a_module_keeps_the_criterion_choice() -> None:
    torch.manual_seed(0)
    model = FunctionalConsumer().eval()
    calib = [torch.randn(32, 6) for _ in range(2)]
    small = graphprune.compact(model, calib[0][:4], 0.5, data=calib, reconstruct=True)
    plain = graphprune.compact(model, calib[0][:4], 0.5)
    assert small.fc1.out_features == 6
    assert_same_outputs(small, plain, calib[1], rtol=1e-6, what="no statistics: l2's units, no refit")
