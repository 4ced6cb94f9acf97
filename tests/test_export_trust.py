"""export_onnx exports what the model computes in eval mode, and judges each output at its precision.

Issue 10, item 4: after the TorchScript exporter failed on a spectral-norm model, the dynamo
exporter traced it with every inner module back in training mode (power iteration on), so the
file held other weights than the model; and a float16 model failed a float32 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import graphprune
from graphprune.errors import VerificationError
from graphprune.export.onnx_export import compare_outputs


def test_fallback_exporter_sees_the_eval_mode_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 4))).eval()
    x = torch.randn(2, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = graphprune.export_onnx(model, x, tmp_path / "sn.onnx")
    # TorchScript cannot export spectral norm's vdot: the dynamo exporter made this file
    assert result.exporter == "dynamo" and result.fallback_reason
    assert result.max_rel_err is not None and result.max_rel_err < 1e-5  # train mode gave 3e-4
    assert all(not m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_half_precision_model_is_checked_at_half_precision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).half().eval()
    x = torch.randn(2, 8).half()
    result = graphprune.export_onnx(model, x, tmp_path / "half.onnx")  # failed at 2e-4 > 1e-4
    assert result.max_rel_err is not None and result.max_rel_err < 1e-2


@pytest.mark.parametrize(("dtype", "error", "fails"), [
    (torch.float16, 5e-3, False),  # a few float16 units in the last place
    (torch.float16, 5e-2, True),   # a real difference still fails
    (torch.float32, 2e-4, True),   # float32 keeps its tolerance
])
def test_tolerance_follows_the_output_dtype(dtype: torch.dtype, error: float, fails: bool) -> None:
    expected = torch.linspace(-1, 1, 32).to(dtype)
    got = [expected.float().numpy() * (1 + error)]
    if fails:
        with pytest.raises(VerificationError, match=str(dtype).replace("torch.", "")):
            compare_outputs(got, [expected])
    else:
        assert compare_outputs(got, [expected])[0][1] == pytest.approx(error, rel=0.1)
    assert np.isfinite(got[0]).all()


def test_failed_export_leaves_an_existing_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the user's previous export")
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(VerificationError):
        graphprune.export_onnx(model, torch.randn(2, 8), target, rtol=0.0, atol=-1.0)  # cannot pass
    assert target.read_bytes() == b"the user's previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging left behind
    result = graphprune.export_onnx(model, torch.randn(2, 8), target)
    assert result.path == target and target.read_bytes() != b"the user's previous export"
