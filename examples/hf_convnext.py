"""Compact a Hugging Face ConvNeXt (built from a config, random weights: no download).

    python examples/hf_convnext.py           # ConvNeXt-T sized, 224x224 input
    python examples/hf_convnext.py --tiny    # tiny config and a 32x32 input: a few seconds

The result is still a ``ConvNextForImageClassification``; graphprune updates the module attributes
(channels, LayerNorm shapes) so that the compact model runs with the library's own forward code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

import graphprune


def main() -> None:
    args = _common.parse_args(__doc__)

    torch.manual_seed(0)
    if args.tiny:
        config = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_labels=10)
        size, runs = 32, 5
    else:
        config = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], num_labels=1000)
        size, runs = 224, 20
    model = ConvNextForImageClassification(config).eval()
    pixels = torch.randn(1, 3, size, size)

    small = graphprune.compact(model, pixels, ratio=args.ratio)
    print(type(small).__name__, "logits", tuple(small(pixels).logits.shape), "(unchanged)")

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, pixels, Path(tmp) / "convnext_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
    print(graphprune.benchmark(model, small, pixels, runs=runs))


if __name__ == "__main__":
    main()
