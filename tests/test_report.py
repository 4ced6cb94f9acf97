"""Plots (graphprune.export.report) and the sweep / target CLI commands.

A plot is checked by reading the PNG back: right size, and not blank (the drawn bars change the
pixels). Whether it *reads* well was checked by looking at it; see notes/speed.md.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import graphprune
from graphprune import zoo
from graphprune.cli.commands import main
from graphprune.export.report import layer_out_widths, plot_candidates, plot_sweep, plot_widths

pytest.importorskip("matplotlib")


def _image(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_layer_widths_are_the_models_output_widths():
    model, x = zoo.build("resnet18", "tiny")
    small = graphprune.compact(model, x, 0.5)
    before, after = layer_out_widths(model), layer_out_widths(small)
    assert before["conv1"] == model.conv1.out_channels and after["conv1"] == small.conv1.out_channels
    assert after["conv1"] < before["conv1"]
    assert before["fc"] == after["fc"]  # the output keeps its size


def test_plot_widths_from_models_and_from_a_benchmark_report(tmp_path):
    model, x = zoo.build("resnet18", "tiny")
    small = graphprune.compact(model, x, 0.5)
    _image(plot_widths(model, small, tmp_path / "w.png"))
    report = graphprune.benchmark(model, small, x, runs=2, warmup=1)
    _image(plot_widths(report, path=tmp_path / "w2.png"))
    with pytest.raises(TypeError):
        plot_widths(model, path=tmp_path / "w3.png")


def test_plot_sweep_with_and_without_latency(tmp_path):
    rows = [
        {"ratio": r, "params_frac": 1 - r, "flops_frac": (1 - r) ** 2, "ideal_speedup": 1 / (1 - r) ** 2,
         "latency_ms": 2 * (1 - r), "p10_ms": 1.9 * (1 - r), "p90_ms": 2.2 * (1 - r), "baseline_ms": 2.0,
         "speedup": 1 / (1 - r), "efficiency": (1 - r)}
        for r in (0.0, 0.25, 0.5)
    ]
    _image(plot_sweep(rows, tmp_path / "s.png", title="synthetic"))
    drop = ("speedup", "efficiency")
    static = [{k: v for k, v in r.items() if "ms" not in k and k not in drop} for r in rows]
    _image(plot_sweep(static, tmp_path / "s2.png"))
    with pytest.raises(ValueError):
        plot_sweep([], tmp_path / "s3.png")


def test_plot_candidates_of_a_search(tmp_path):
    from graphprune.search.targets import compact_to_target

    model, x = zoo.build("mlp", "tiny")
    result = compact_to_target(model, x, target_flops=0.5)
    _image(plot_candidates(result, tmp_path / "c.png"))


def test_missing_matplotlib_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install"):
        row = {"ratio": 0.0, "flops_frac": 1.0, "params_frac": 1.0, "ideal_speedup": 1.0}
        plot_sweep([row], tmp_path / "x.png")


def test_cli_sweep_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["sweep", "zoo:mlp", "--ratios", "0,0.5", "--no-latency", "--quiet",
                 "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and rows[1]["params"] < rows[0]["params"]
    _image(out_png)
    assert "ratio" in capsys.readouterr().out


def test_cli_target_meets_a_flops_budget(tmp_path, capsys):
    out = tmp_path / "small.pt"
    code = main(["target", "zoo:mlp", "--flops", "0.5", "--quiet", "--output", str(out),
                 "--json", str(tmp_path / "t.json")])
    assert code == 0
    model, x = zoo.build("mlp", "tiny")
    small = torch.load(out, weights_only=False)
    ratio = graphprune.count_flops(small, x) / graphprune.count_flops(model, x)
    assert abs(ratio / 0.5 - 1) <= 0.02
    assert json.loads((tmp_path / "t.json").read_text())["met"] is True
    assert "candidates tried" in capsys.readouterr().out
    assert main(["target", "zoo:mlp", "--quiet"]) == 2  # a target is required
