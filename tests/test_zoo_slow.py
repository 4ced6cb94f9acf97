"""A fixed handful of the zoo benchmark's models (tools/zoo.py) through graphprune.compact at 0.3.

Real torchvision and timm models, built exactly as the benchmark builds them (tools/zoo_models.py:
random weights, the model's default input size capped at 224), each checked against the oracles:
the user's model untouched, output shapes kept, parameters and FLOPs down, the user's class back,
onnxruntime equal to torch. Two torchvision models and three timm families of different kinds
(a CNN with depthwise and squeeze-excite blocks, a vision transformer, a hybrid conv/attention).

Slow (a minute or more per model on a busy machine) and needs torchvision and timm (never
graphprune dependencies; DEVELOPERS.md says how to install them): runs only with GRAPHPRUNE_SLOW=1
and skips when either package is not importable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

if not os.environ.get("GRAPHPRUNE_SLOW"):
    pytest.skip("real torchvision/timm models: run with GRAPHPRUNE_SLOW=1", allow_module_level=True)

from tests.oracles import assert_untouched, check_onnx, check_shape_params_flops, compacted  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
try:
    import zoo_models

    zoo_models.import_torchvision()
    import timm  # noqa: F401
except Exception as exc:  # torchvision, timm (or torch_pruning, which tools/ import) missing
    pytest.skip(f"torchvision/timm not importable ({type(exc).__name__}: {exc})",
                allow_module_level=True)

MODELS = ["tv_resnet18", "tv_mobilenet_v3_small", "timm_mobilenetv3_small_050", "timm_deit_tiny_patch16_224",
          "timm_mobilevit_xxs"]
RATIO = 0.3


def build(name: str) -> tuple[nn.Module, Any]:
    return zoo_models.build(name)


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_compacts_under_every_oracle(name: str) -> None:
    c = compacted(build, name, RATIO)
    assert_untouched(c.model, c.before)
    check_shape_params_flops(c.model, c.small, c.example_input)
    assert type(c.small) is type(c.model), (
        f"compact returned {type(c.small).__name__}, not the user's {type(c.model).__name__}; "
        f"graphprune warnings: {c.warnings}"
    )
    check_onnx(c.small, c.example_input)
