"""Compact a plain MLP: hidden features are removed, input and output sizes stay.

    python examples/mlp.py           # 784 -> 2048 -> 2048 -> 10, batch 64
    python examples/mlp.py --tiny    # 16 -> 32 -> 32 -> 4: a fraction of a second

Also shows the two-step API: make a plan, look at it (or save it as JSON), then apply it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
import torch
from torch import nn

import graphprune


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(cin, cout), nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])  # no activation after the last layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    args = _common.parse_args(__doc__, ratio=0.5)

    torch.manual_seed(0)
    sizes, batch, runs = ((16, 32, 32, 4), 2, 5) if args.tiny else ((784, 2048, 2048, 10), 64, 50)
    model = MLP(sizes).eval()
    x = torch.randn(batch, sizes[0])

    plan = graphprune.make_plan(model, x, ratio=args.ratio)
    print(plan)  # which hidden features go, and which groups are left alone (and why)
    small = graphprune.apply_plan(model, plan)
    print("hidden sizes:", [m.out_features for m in small.net if isinstance(m, nn.Linear)][:-1])

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "plan.json").write_text(plan.to_json())  # re-apply later with Plan.from_json
        result = graphprune.export_onnx(small, x, Path(tmp) / "mlp_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
    print(graphprune.benchmark(model, small, x, runs=runs))


if __name__ == "__main__":
    main()
