"""Compact a Hugging Face ViT: whole attention heads and MLP units, no settings.

    python examples/vit.py            # ViT-Small/16 sized (22M parameters), 224x224 input
    python examples/vit.py --tiny     # tiny config and a 32x32 input: a few seconds

The model is built from a config with random weights (no download). graphprune finds the heads in
the q/k/v projections itself, removes whole heads and MLP units, updates the modules' attributes
and ``model.config`` (``num_attention_heads``, ``intermediate_size``, ``head_dim``), so the result
is still a ``ViTForImageClassification`` that ``save_pretrained`` / ``from_pretrained`` reload.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

import graphprune


def build(tiny: bool) -> tuple[ViTForImageClassification, torch.Tensor]:
    if tiny:
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, num_labels=10)
    else:
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                           num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    return ViTForImageClassification(config).eval(), torch.randn(1, 3, config.image_size, config.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and input (smoke test)")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, pixels = build(args.tiny)
    small, plan = graphprune.compact_with_plan(model, pixels, ratio=args.ratio)
    print(plan)
    cfg = small.config
    print(f"{type(small).__name__}: {cfg.num_attention_heads} heads of {cfg.head_dim}, "
          f"MLP {cfg.intermediate_size} (was {model.config.num_attention_heads} heads, "
          f"MLP {model.config.intermediate_size}); logits {tuple(small(pixels).logits.shape)} (unchanged)")

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, pixels, Path(tmp) / "vit_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        small.save_pretrained(Path(tmp) / "vit_small")
        again = ViTForImageClassification.from_pretrained(Path(tmp) / "vit_small").eval()
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        logits, expected = again(pixels).logits, small(pixels).logits
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"save_pretrained -> from_pretrained: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
    print(graphprune.benchmark(model, small, pixels, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
