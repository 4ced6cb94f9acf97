"""Compact a ResNet-style CNN, export it to ONNX and measure the speed-up in onnxruntime.

    python examples/cnn_resnet.py            # ResNet-18-sized, 224x224 input
    python examples/cnn_resnet.py --tiny     # tiny widths and a 32x32 input: a few seconds

The model is ordinary user code: residual blocks whose additions tie the channels of several
convolutions together. graphprune finds those ties itself; nothing here tells it about them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
import torch
from torch import nn

import graphprune


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks: int = 2, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def main() -> None:
    args = _common.parse_args(__doc__)

    torch.manual_seed(0)
    if args.tiny:
        model, x, runs = ResNet(widths=(8, 16, 32, 64), blocks=1, classes=10), torch.randn(1, 3, 32, 32), 5
    else:
        model, x, runs = ResNet(), torch.randn(1, 3, 224, 224), 30
    model.eval()

    small = graphprune.compact(model, x, ratio=args.ratio)  # a smaller ResNet, same class
    print(type(small).__name__, "output shape", tuple(small(x).shape), "(unchanged)")

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, x, Path(tmp) / "resnet_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
    print(graphprune.benchmark(model, small, x, runs=runs))


if __name__ == "__main__":
    main()
