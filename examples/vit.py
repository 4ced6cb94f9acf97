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


def save_and_reload(
    model: ViTForImageClassification, small: ViTForImageClassification, plan: graphprune.Plan, path: Path
):
    """``save_pretrained`` when graphprune could write the new widths into ``small.config``.

    Otherwise (the config class refuses them, e.g. LLaMA wants hidden_size % heads == 0) the
    weights and the plan go through ``graphprune.save`` and come back with ``graphprune.load`` on
    a freshly built base model of the original config.
    """
    if any(note.startswith("model.config updated") for note in plan.notes):
        small.save_pretrained(path)
        return ViTForImageClassification.from_pretrained(path).eval(), "save_pretrained -> from_pretrained"
    graphprune.save(small, path, plan)
    base = ViTForImageClassification(model.config)  # the original architecture; weights do not matter
    return graphprune.load(path, base).eval(), "graphprune.save -> graphprune.load"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and input (smoke test)")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

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
        again, how = save_and_reload(model, small, plan, Path(tmp) / "vit_small")
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        logits, expected = again(pixels).logits, small(pixels).logits
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"{how}: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
    print(graphprune.benchmark(model, small, pixels, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
