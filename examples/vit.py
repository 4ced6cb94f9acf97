"""Compact a Hugging Face ViT: whole attention heads and MLP units, no settings.

    python examples/vit.py            # ViT-Small/16 sized (22M parameters), 224x224 input
    python examples/vit.py --tiny     # tiny config and a 32x32 input: a few seconds

The model is built from a config with random weights (no download). graphprune finds the heads in
the q/k/v projections itself, removes whole heads and MLP units, updates the modules' attributes
and ``model.config`` (``num_attention_heads``, ``intermediate_size``, ``head_dim``), so the result
is still a ``ViTForImageClassification`` that ``save_pretrained`` / ``from_pretrained`` reload
(``graphprune.save`` / ``graphprune.load`` where a config cannot describe the compact widths).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
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
    args = _common.parse_args(__doc__)

    torch.manual_seed(0)
    model, pixels = build(args.tiny)
    small, plan = graphprune.compact_with_plan(model, pixels, ratio=args.ratio)
    print(plan)
    for name, m in (("was", model), ("now", small)):  # read off the modules of layer 0
        attn, mlp = m.vit.layers[0].attention, m.vit.layers[0].mlp
        print(f"{name}: {attn.q_proj.out_features // attn.head_dim} heads of {attn.head_dim}, "
              f"MLP {mlp.fc1.out_features}, logits {tuple(m(pixels).logits.shape)}")

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, pixels, Path(tmp) / "vit_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        _common.check_reload(model, small, plan, pixels, Path(tmp) / "vit_small")
    print(graphprune.benchmark(model, small, pixels, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
