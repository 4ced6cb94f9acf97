"""``round_to="auto"`` (compact's default): kept widths aligned to what onnxruntime runs well.

Checked against the definition, not against the implementation: a kept width is the aligned one
nearest to ``units * (1 - ratio)`` (or the group's own width), never more than one alignment
step beyond what the ratio asks; convolution channels are aligned, Linear features are cut
exactly; ``round_to=1`` still gives exactly ``round(ratio * units)``; ratio 0 is the identity and
the dead-unit oracle holds in both modes. The speed claims behind the alignments are measured by
tools/width_speed.py and tools/compare.py, not here.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from oracles import check_dead_channels, check_ratio_zero_identity
from torch import nn

import graphprune
from graphprune.cli.common import parse_round_to
from graphprune.errors import InputError, SlowerModelWarning
from graphprune.export.bench import BenchmarkReport, LatencyStats, misaligned_convs, warn_if_slower
from graphprune.graph.analysis import Group, Member
from graphprune.planning.cut import aligned_keep
from graphprune.search.searcher import Ladder

RATIOS = (0.05, 0.1, 0.2, 0.3, 0.37, 0.5, 0.7, 0.9)


def _group(n: int, per_unit: int = 1) -> Group:
    return Group(0, n, [Member("w", 0, np.repeat(np.arange(n), per_unit))])


@pytest.mark.parametrize("align", [4, 8, 16])
def test_aligned_keep_is_the_nearest_allowed_width_and_never_a_step_beyond_the_ratio(align: int) -> None:
    for n in range(1, 100):
        g = _group(n)
        for r in RATIOS:
            want = n * (1 - r)
            k = aligned_keep(g, want, align)
            allowed = list(range(1, n + 1)) if n <= align else [*range(align, n, align), n]
            assert k in allowed, (n, r, k)
            assert abs(k - want) <= min(abs(a - want) for a in allowed) + 1e-9, (n, r, k)
            assert n - k <= r * n + align, (n, r, k)  # at most one step more than asked
            assert 1 <= k <= n


def test_aligned_keep_counts_units_that_span_several_positions() -> None:
    # 12 units of 4 positions (heads of 4): width 4k is a multiple of 16 when k is a multiple of 4
    g = _group(12, per_unit=4)
    for r in RATIOS:
        k = aligned_keep(g, 12 * (1 - r), 16)
        assert k == 12 or (4 * k) % 16 == 0, (r, k)


class _Net(nn.Module):
    """Dense and depthwise convolutions of several widths, then an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.b1 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.c2 = nn.Conv2d(64, 40, 1)
        self.c3 = nn.Conv2d(40, 24, 3, padding=1)
        self.c4 = nn.Conv2d(24, 12, 1)
        self.fc1 = nn.Linear(12, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(torch.relu(self.dw(x))))
        x = torch.relu(self.c4(torch.relu(self.c3(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-0.5, 0.5)
        model.b1.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, 8, 8)


def _expected_alignment(width: int) -> int:
    """The documented rule: the widest of 16, 8, 4 that fits twice in the group's width."""
    return next((a for a in (16, 8, 4) if width >= 2 * a), 1)


def test_auto_default_aligns_conv_channels_and_cuts_linear_features_exactly() -> None:
    model, x = _net()
    ratio = 0.3
    small = graphprune.compact(model, x, ratio)  # round_to="auto" is the default
    for name in ("c1", "c2", "c3", "c4"):
        n, k = getattr(model, name).out_channels, getattr(small, name).out_channels
        a = _expected_alignment(n)
        assert k == n or k % a == 0, (name, n, k)
        assert n - k <= ratio * n + a, (name, n, k)
        assert k < n or a > ratio * n, (name, n, k)  # the ratio was honoured where a step fits
    assert small.dw.groups == small.dw.out_channels == small.c1.out_channels
    assert small.fc1.out_features == 50 - round(ratio * 50)  # Linear widths: exact


def test_round_to_one_keeps_exact_counts() -> None:
    model, x = _net()
    small = graphprune.compact(model, x, 0.3, round_to=1)
    for name in ("c1", "c2", "c3", "c4"):
        n = getattr(model, name).out_channels
        assert getattr(small, name).out_channels == n - round(0.3 * n), name
    assert small.fc1.out_features == 35


def test_auto_at_ratio_zero_is_the_identity() -> None:
    check_ratio_zero_identity(*_net())


@pytest.mark.parametrize("round_to", ["auto", 1])
def test_removing_exactly_dead_units_with_aligned_or_exact_widths(round_to: int | str) -> None:
    check_dead_channels(*_net(), 0.3, round_to=round_to)


def test_target_ladder_with_auto_steps_through_aligned_widths_only() -> None:
    model, x = _net()
    an = graphprune.analyze(model, x)
    lad = Ladder(an, round_to="auto")
    wide = {g.index: g.num_units for g in an.groups
            if any(m.name in ("c1.weight", "c2.weight") and m.dim == 0 for m in g.members)}
    assert sorted(wide.values()) == [40, 64]
    for step in range(len(lad) + 1):
        for gi, removed in lad.counts(step).items():
            if gi in wide:
                kept = wide[gi] - removed
                assert kept == wide[gi] or kept % 16 == 0, (step, wide[gi], kept)


def test_round_to_rejects_bad_values_with_a_clear_error() -> None:
    model, x = _net()
    with pytest.raises(InputError, match="round_to must be 'auto' or a positive integer"):
        graphprune.compact(model, x, 0.3, round_to="fast")
    assert parse_round_to("auto") == "auto" and parse_round_to("8") == 8
    with pytest.raises(argparse.ArgumentTypeError):
        parse_round_to("0")


def test_cli_round_to_defaults_to_auto_and_parses_every_form() -> None:
    from graphprune.cli.commands import build_parser

    parser = build_parser()
    for cmd in ("compact", "plan", "benchmark"):
        assert parser.parse_args([cmd, "zoo:mlp"]).round_to == "auto"
        assert parser.parse_args([cmd, "zoo:mlp", "--round-to", "1"]).round_to == 1
    assert parser.parse_args(["sweep", "zoo:mlp"]).round_to == "auto"
    target = parser.parse_args(["target", "zoo:mlp", "--flops", "0.5", "--round-to", "measured"])
    assert target.round_to == "measured"


def _stats(median: float, low: float) -> LatencyStats:
    return LatencyStats(median, low, median * 1.1, low, median, 20, 1)


def _report(orig_ms: float, compact_ms: float, after: dict[str, tuple[int, ...]]) -> BenchmarkReport:
    before = {"conv": (64, 32, 3, 3), "fc": (10, 64)}
    return BenchmarkReport(
        original_params=1000, compact_params=500, original_flops=10_000, compact_flops=5_000,
        original_latency=_stats(orig_ms, orig_ms * 0.9), compact_latency=_stats(compact_ms, compact_ms * 0.9),
        speedup=orig_ms / compact_ms, ideal_speedup=2.0, efficiency=orig_ms / compact_ms / 2.0,
        original_exporter="torchscript", compact_exporter="torchscript",
        widths_before=before, widths_after=after,
    )


def test_benchmark_report_flags_a_slower_model_and_names_misaligned_convs() -> None:
    slow = _report(1.0, 1.3, {"conv": (45, 32, 3, 3), "fc": (10, 45)})
    assert slow.slower
    reasons = slow.slow_reasons()
    assert any("conv (45x32)" in r for r in reasons), reasons
    assert "WARNING: the compact model is slower" in str(slow)
    with pytest.warns(SlowerModelWarning, match="slower than the original"):
        warn_if_slower(slow)
    fast = _report(1.0, 0.6, {"conv": (48, 32, 3, 3), "fc": (10, 48)})
    assert not fast.slower and "WARNING" not in str(fast)
    noise = _report(1.0, 1.02, {"conv": (48, 32, 3, 3), "fc": (10, 48)})  # within the noise margin
    assert not noise.slower
    tiny = _report(0.05, 0.08, {"conv": (48, 32, 3, 3), "fc": (10, 48)})
    assert any("fixed per-op costs" in r for r in tiny.slow_reasons())


def test_misaligned_convs_ignores_unchanged_layers_first_layers_and_depthwise() -> None:
    before = {"stem": (64, 3, 3, 3), "dw": (64, 1, 3, 3), "pw": (40, 64, 1, 1), "fc": (10, 40)}
    after = {"stem": (48, 3, 3, 3), "dw": (44, 1, 3, 3), "pw": (40, 48, 1, 1), "fc": (10, 40)}
    names = [n for n, _ in misaligned_convs(after, before)]
    assert names == ["dw", "pw"]  # dw: 44 channels; pw: 40 outputs (changed: 48 inputs)
    assert [n for n, _ in misaligned_convs(before)] == ["pw"]  # without "before": every layer
