"""Compact a Hugging Face BERT classifier: attention heads and MLP units, no settings.

    python examples/bert.py            # BERT-small sized (4 layers, hidden 512), 128 tokens
    python examples/bert.py --tiny     # tiny config and 8 tokens: a few seconds

BERT derives its head width from ``hidden_size / num_attention_heads``, so a BERT with fewer
heads cannot be described by a ``BertConfig``: graphprune leaves the config alone (the plan says
so) and the compact model is saved with ``graphprune.save`` (safetensors weights + the plan) and
rebuilt with ``graphprune.load`` on a freshly built base model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import graphprune


def build(tiny: bool) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    if tiny:
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2)
        seq = 8
    else:
        config = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                            intermediate_size=2048, num_labels=2)
        seq = 128
    ids = torch.randint(0, config.vocab_size, (1, seq))
    return config, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and input (smoke test)")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config, inputs = build(args.tiny)
    model = BertForSequenceClassification(config).eval()
    small, plan = graphprune.compact_with_plan(model, inputs, ratio=args.ratio)
    print(plan)
    attn = small.bert.encoder.layer[0].attention.self
    print(f"{type(small).__name__}: layer 0 keeps {attn.num_attention_heads} of {config.num_attention_heads} "
          f"heads, logits {tuple(small(**inputs).logits.shape)} (unchanged)")

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, inputs, Path(tmp) / "bert_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        graphprune.save(small, Path(tmp) / "bert_small", plan)
        base = BertForSequenceClassification(config)  # same architecture; its weights do not matter
        again = graphprune.load(Path(tmp) / "bert_small", base).eval()
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        logits, expected = again(**inputs).logits, small(**inputs).logits
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"graphprune.save -> graphprune.load: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
    print(graphprune.benchmark(model, small, inputs, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
