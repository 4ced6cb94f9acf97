"""The ``graphprune`` command line, run in-process through ``main([...])``.

Oracles: exit codes; files written; the ONNX file run in onnxruntime against the compact model
that ``--output`` saved (so the check does not trust either artefact alone); parameter counts
against the original model.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphprune
import graphprune.cli.demo
from graphprune.cli import commands as cli
from graphprune.cli import common


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _assert_onnx_matches_saved(onnx_path: Path, pt_path: Path, x: torch.Tensor) -> nn.Module:
    """The ONNX file and the torch.save'd compact model give the same outputs on ``x``."""
    assert onnx_path.is_file() and pt_path.is_file()
    small = torch.load(pt_path, weights_only=False).eval()
    with torch.no_grad():
        expected = small(x).numpy()
    np.testing.assert_allclose(_ort_run(onnx_path, x), expected, rtol=1e-4, atol=1e-5)
    return small


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        return model.eval(), torch.randn(4, 12)

    def bare():
        return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).eval()

    NOT_A_MODEL = 42
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway importable module with model factories; returns its name."""
    name = f"gp_cli_user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_demo_quick_trains_compacts_and_reports(tmp_path, monkeypatch, capsys):
    results = []
    real = graphprune.cli.demo.run_demo
    monkeypatch.setattr(
        graphprune.cli.demo, "run_demo", lambda **kw: results.append(real(**kw)) or results[-1]
    )

    assert cli.main(["demo", "--quick", "--out-dir", str(tmp_path)]) == 0

    (r,) = results
    out = capsys.readouterr().out
    assert "onnxruntime latency (ms)" in out and "after 1-epoch fine-tune" in out
    # Even a 3-epoch run learns digits far above chance (10%); fine-tuning keeps it useful.
    assert 0.8 <= r["acc_before"] <= 1.0
    assert 0.0 <= r["acc_compacted"] <= 1.0
    assert 0.5 <= r["acc_finetuned"] <= 1.0
    assert r["params"][1] < r["params"][0] and r["flops"][1] < r["flops"][0]
    assert r["params"] == (graphprune.count_params(r["model"]), graphprune.count_params(r["small"]))
    assert r["speedup"] > 0 and all(t > 0 for t in r["latency_ms"])
    # Both ONNX files run in onnxruntime and agree with the torch models they came from.
    x = graphprune.cli.demo.load_digits_data().x_test[: graphprune.cli.demo.BENCH_BATCH]
    for path, model in zip(r["onnx_paths"], (r["model"], r["small"])):
        with torch.no_grad():
            np.testing.assert_allclose(_ort_run(path, x), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_compact_zoo_mlp_writes_matching_onnx(tmp_path, capsys):
    onnx_path, pt_path = tmp_path / "mlp.onnx", tmp_path / "mlp.pt"
    argv = ["compact", "zoo:mlp", "--ratio", "0.3", "--onnx", str(onnx_path), "--output", str(pt_path)]
    rc = cli.main(argv)
    assert rc == 0
    model, x = common.load_model("zoo:mlp")
    small = _assert_onnx_matches_saved(onnx_path, pt_path, x)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    assert "params" in capsys.readouterr().out


def test_compact_torch_saved_file(tmp_path):
    model_path, onnx_path, pt_path = tmp_path / "net.pt", tmp_path / "net.onnx", tmp_path / "small.pt"
    model = _conv_net()
    torch.save(model, model_path)
    rc = cli.main(["compact", str(model_path), "--ratio", "0.5", "--input-shape", "2,3,8,8",
                   "--onnx", str(onnx_path), "--output", str(pt_path)])
    assert rc == 0
    small = _assert_onnx_matches_saved(onnx_path, pt_path, torch.randn(2, 3, 8, 8))
    assert graphprune.count_params(small) < graphprune.count_params(model)


def test_compact_module_callable_with_plan_and_benchmark(tmp_path, user_module, capsys):
    onnx_path, pt_path, plan_path = tmp_path / "u.onnx", tmp_path / "u.pt", tmp_path / "plan.json"
    rc = cli.main(["compact", f"{user_module}:build", "--ratio", "0.5", "--onnx", str(onnx_path),
                   "--output", str(pt_path), "--plan", str(plan_path), "--benchmark", "--runs", "3"])
    assert rc == 0
    model, x = common.load_model(f"{user_module}:build")
    small = _assert_onnx_matches_saved(onnx_path, pt_path, x)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    # The saved plan re-applies to the same model and gives the same compact model.
    again = graphprune.apply_plan(model, graphprune.Plan.from_json(plan_path.read_text()))
    torch.testing.assert_close(again(x), small(x))
    assert str(graphprune.make_plan(model, x, ratio=0.5)) in capsys.readouterr().out


def test_plan_then_compact_from_plan(tmp_path, user_module, capsys):
    plan_path, pt_path = tmp_path / "plan.json", tmp_path / "small.pt"
    assert cli.main(["plan", f"{user_module}:build", "--ratio", "0.25", "--json", str(plan_path)]) == 0
    json.loads(plan_path.read_text())  # valid JSON
    assert not pt_path.exists()  # analysis only
    argv = ["compact", f"{user_module}:build", "--from-plan", str(plan_path), "--output", str(pt_path)]
    rc = cli.main(argv)
    assert rc == 0
    model, x = common.load_model(f"{user_module}:build")
    expected = graphprune.compact(model, x, ratio=0.25)
    torch.testing.assert_close(torch.load(pt_path, weights_only=False)(x), expected(x))


def test_benchmark_writes_json(tmp_path, user_module, capsys):
    json_path = tmp_path / "bench.json"
    rc = cli.main(["benchmark", f"{user_module}:build", "--ratio", "0.5", "--runs", "3", "--warmup", "1",
                   "--json", str(json_path)])
    assert rc == 0
    data = json.loads(json_path.read_text())
    assert data["ratio"] == 0.5 and data["report"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compact", "gp_no_such_module_xyz:build"], "cannot import module 'gp_no_such_module_xyz'"),
        (["compact", "no_colon_no_file"], "cannot resolve MODEL 'no_colon_no_file'"),
        (["compact", "missing_model.pt"], "no such file 'missing_model.pt'"),
        (["compact", "zoo:no_such_zoo_model"], "unknown zoo model 'no_such_zoo_model'"),
        (["compact", "{mod}:nope"], "has no attribute 'nope'"),
        (["compact", "{mod}:NOT_A_MODEL"], "neither a callable nor an nn.Module"),
        (["compact", "{mod}:bare"], "--input-shape"),
        (["plan", "{mod}:bare", "--input-shape", "2,7"], "graphprune: error:"),  # model rejects input
    ],
)
def test_bad_model_spec_is_a_clean_error(argv, message, user_module, capsys):
    argv = [a.format(mod=user_module) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphprune: error: ") and message in err
    assert "Traceback" not in err


def test_state_dict_file_is_refused_with_the_fix(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(_conv_net().state_dict(), path)
    assert cli.main(["compact", str(path), "--input-shape", "1,3,8,8"]) == 2
    assert "state_dict" in capsys.readouterr().err


def test_usage_errors_return_2_and_help_returns_0(capsys):
    assert cli.main(["compact", "zoo:mlp", "--ratio", "1.5"]) == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["compact", "--help"]) == 0
    assert "only load files you trust" in " ".join(capsys.readouterr().out.split())  # undo wrapping


def test_parse_shape():
    assert common.parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert common.parse_shape("2x16") == (2, 16)
    for bad in ("", "a,b", "1,0", "-1,3"):
        with pytest.raises(graphprune.InputError):
            common.parse_shape(bad)
