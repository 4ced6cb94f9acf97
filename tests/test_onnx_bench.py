"""ONNX export and benchmarking: onnxruntime must agree with torch, and counts must match by hand.

The oracles: torch's own output on the same input (for every export), closed-form FLOP and
parameter counts (for the counters), and the model's state before the call (for "never mutates").
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import VerificationError
from graphprune.export.bench import (
    BenchmarkReport,
    LatencyStats,
    benchmark,
    count_flops,
    count_params,
    layer_widths,
    measure_latency,
)
from graphprune.export.onnx_export import OnnxExportError, compare_outputs, export_onnx, run_onnx
from graphprune.graph.inputs import flatten_outputs

# --------------------------------------------------------------------------------------------------
# Tiny models


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x)) + x
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def mlp(hidden: int = 64, d_in: int = 32, d_out: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class KwargsModel(nn.Module):
    """HF-like: keyword tensor inputs plus a non-tensor flag; returns a dict holding a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0, use_cache: bool = True):
        h = self.norm(self.emb(input_ids)) * scale
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h), "extra": (h.sum(-1), input_ids.argmax(-1))}


class GQAAttention(nn.Module):
    """Grouped-query SDPA (as in HF LLaMA): the TorchScript exporter refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        kv = self.kv(x).view(b, t, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)


class CallCounter(nn.Module):
    """Returns a different result on every call, so a traced copy cannot match the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.lin(x), self.lin(x) + float(self.calls)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return state, flags


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    state, flags = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), f"{k} changed"
    assert flags == {name: m.training for name, m in model.named_modules()}


def halved_mlp(model: nn.Sequential) -> nn.Sequential:
    """The first half of the hidden units of ``mlp(...)``, sliced by hand."""
    first, last = model[0], model[2]
    h = first.out_features // 2
    small = mlp(h, first.in_features, last.out_features)
    with torch.no_grad():
        small[0].weight.copy_(first.weight[:h])
        small[0].bias.copy_(first.bias[:h])
        small[2].weight.copy_(last.weight[:, :h])
        small[2].bias.copy_(last.bias)
    return small


# --------------------------------------------------------------------------------------------------
# export_onnx


def test_conv_net_export_matches_torch_and_leaves_the_model_untouched(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    model.train()
    model.fc.eval()  # mixed flags must come back exactly as they were, module by module
    with torch.no_grad():  # non-trivial BN statistics, so eval vs train mode would show
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)

    result = export_onnx(model, x, tmp_path / "conv.onnx")

    assert_unchanged(model, before)
    assert result.path.exists()
    assert result.exporter == "torchscript"
    assert result.max_abs_err is not None and result.max_abs_err < 1e-4
    # Independent oracle: the eval-mode torch output on the same input.
    expected = copy.deepcopy(model).eval()(x).detach().numpy()
    (got,) = run_onnx(result.path, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_mlp_export_records_exporter_and_names(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(3, 32)
    result = export_onnx(model, x, tmp_path / "mlp.onnx")
    assert result.exporter in ("torchscript", "dynamo")
    assert result.input_names == ["input"]
    assert result.output_names == ["output"]
    assert result.max_rel_err is not None and result.max_rel_err < 1e-4
    assert "torchscript" in str(result)
    np.testing.assert_allclose(run_onnx(result.path, x)[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_kwargs_model_with_dict_of_tuples_output_exports_every_tensor(tmp_path):
    torch.manual_seed(0)
    model = KwargsModel()
    example = {
        "input_ids": torch.randint(0, 20, (2, 6)),
        "attention_mask": torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2]),
        "scale": 2.0,  # non-tensor: baked into the graph
        "use_cache": False,
    }
    before = snapshot(model)
    result = export_onnx(model, example, tmp_path / "kw.onnx")
    assert_unchanged(model, before)

    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names == ["logits", "extra_0", "extra_1"]
    with torch.no_grad():
        expected = flatten_outputs(model(**example))
    got = run_onnx(result.path, example)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[2], expected[2].numpy())  # integer output: exact


def test_gqa_attention_falls_back_to_the_dynamo_exporter(tmp_path):
    torch.manual_seed(0)
    model = GQAAttention()
    x = torch.randn(1, 5, 16)
    result = export_onnx(model, x, tmp_path / "gqa.onnx")
    assert result.exporter == "dynamo"
    assert result.fallback_reason is not None and "torchscript" in result.fallback_reason
    np.testing.assert_allclose(run_onnx(result.path, x)[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_forcing_an_exporter_that_cannot_export_raises_with_the_reason(tmp_path):
    with pytest.raises(OnnxExportError, match="torchscript"):
        export_onnx(GQAAttention(), torch.randn(1, 5, 16), tmp_path / "gqa.onnx", exporter="torchscript")


def test_onnx_that_disagrees_with_torch_raises_verification_error_naming_the_output(tmp_path):
    # The reference call sees calls=1; the traced graph bakes in a later count, so output 1 differs.
    with pytest.raises(VerificationError, match=r"output 1"):
        export_onnx(CallCounter(), torch.randn(2, 4), tmp_path / "counter.onnx")


def test_compare_outputs_uses_magnitude_scaled_tolerance():
    ref = [torch.tensor([100.0, 0.0]), torch.tensor([1.0, 2.0])]
    # 1e-3 off on a value of 100: within rtol 1e-4 * 100 = 1e-2.
    errs = compare_outputs([np.array([100.001, 0.0]), np.array([1.0, 2.0])], ref, rtol=1e-4, atol=1e-5)
    assert errs[0][0] == pytest.approx(1e-3, rel=1e-3)
    assert errs[0][1] == pytest.approx(1e-5, rel=1e-3)
    with pytest.raises(VerificationError, match=r"output 1 \(b\).*max abs err 1\.000e-01"):
        compare_outputs(
            [np.array([100.0, 0.0]), np.array([1.1, 2.0])], ref, rtol=1e-4, atol=1e-5, names=["a", "b"]
        )
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs([np.zeros(3), np.zeros(2)], ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Counters


@pytest.mark.parametrize(("batch", "d_in", "d_out"), [(1, 3, 5), (7, 16, 4)])
def test_flops_of_a_linear_layer_are_two_times_the_macs(batch, d_in, d_out):
    assert count_flops(nn.Linear(d_in, d_out), torch.randn(batch, d_in)) == 2 * batch * d_in * d_out


def test_flops_of_a_conv_layer_match_the_closed_form():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    b, h, w = 2, 5, 7
    assert count_flops(conv, torch.randn(b, 4, h, w)) == 2 * b * 6 * h * w * 4 * 3 * 3


def test_count_flops_accepts_kwargs_and_leaves_training_flags():
    model = KwargsModel().train()
    flops = count_flops(model, {"input_ids": torch.randint(0, 20, (2, 6))})
    assert flops == 2 * (2 * 6) * 8 * 5  # only the head is a matmul
    assert model.training


def test_tied_weights_are_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # the usual LM tying: the same Parameter object
    assert count_params(nn.ModuleList([emb, head])) == 40

    # Tied by sharing storage through two distinct Parameter objects.
    other = nn.Linear(4, 10, bias=False)
    other.weight = nn.Parameter(emb.weight.data)
    assert count_params(nn.ModuleList([emb, other])) == 40
    assert count_params(mlp(64, 32, 10)) == 32 * 64 + 64 + 64 * 10 + 10


def test_layer_widths_lists_weight_shapes_of_conv_linear_norm_embedding():
    widths = layer_widths(ConvNet())
    assert widths == {"conv1": (8, 3, 3, 3), "bn1": (8,), "conv2": (8, 4, 3, 3), "fc": (4, 8)}
    assert layer_widths(KwargsModel()) == {"emb": (20, 8), "norm": (8,), "head": (5, 8)}


# --------------------------------------------------------------------------------------------------
# Latency and the benchmark report


def test_measure_latency_returns_ordered_statistics(tmp_path):
    x = torch.randn(4, 32)
    path = export_onnx(mlp(), x, tmp_path / "m.onnx").path
    stats = measure_latency(path, x, warmup=1, runs=5, threads=1)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 5 and stats.threads == 1
    assert 0 < stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    with pytest.raises(ValueError):
        measure_latency(path, x, runs=0)


def test_benchmark_of_a_halved_mlp_reports_sizes_flops_and_speedup(tmp_path):
    torch.manual_seed(0)
    big = mlp(256, 64, 10)
    small = halved_mlp(big)
    x = torch.randn(8, 64)
    before = snapshot(big)

    report = benchmark(big, small, x, warmup=2, runs=5, workdir=tmp_path)

    assert_unchanged(big, before)
    assert isinstance(report, BenchmarkReport)
    assert report.original_params == count_params(big) and report.compact_params == count_params(small)
    assert report.original_flops == 2 * 8 * (64 * 256 + 256 * 10)
    assert report.compact_flops == 2 * 8 * (64 * 128 + 128 * 10)
    assert report.ideal_speedup == pytest.approx(report.original_flops / report.compact_flops)
    assert report.ideal_speedup == pytest.approx(2.0)
    assert report.speedup > 0
    assert report.speedup == pytest.approx(
        report.original_latency.median_ms / report.compact_latency.median_ms
    )
    assert report.efficiency == pytest.approx(report.speedup / report.ideal_speedup)
    assert report.original_latency.runs == report.compact_latency.runs == 5
    assert report.changed_layers() == {"0": ((256, 64), (128, 64)), "2": ((10, 256), (10, 128))}
    assert (tmp_path / "original.onnx").exists() and (tmp_path / "compact.onnx").exists()

    text = str(report)
    for needle in ("original", "compact", "params", "FLOPs", "latency median", "speed-up", "ideal"):
        assert needle in text
    assert f"{report.original_params:,}" in text and f"{report.compact_params:,}" in text
    assert "256x64 -> 128x64" in text

    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert data == json.loads((tmp_path / "report.json").read_text())
    assert data["compact_flops"] == report.compact_flops
    assert data["widths_after"]["0"] == [128, 64]
    assert data["flop_ratio"] == pytest.approx(0.5)
