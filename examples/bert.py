"""Compact a Hugging Face BERT classifier: attention heads and MLP units, no settings.

    python examples/bert.py            # BERT-small sized (4 layers, hidden 512), 128 tokens
    python examples/bert.py --tiny     # tiny config and 8 tokens: a few seconds

BERT derives its head width from ``hidden_size / num_attention_heads``, so a BERT with fewer
heads cannot be described by a ``BertConfig``: graphprune leaves the config alone (the plan says
so) and the compact model is saved with ``graphprune.save`` (safetensors weights + the plan) and
rebuilt with ``graphprune.load`` on a freshly built base model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
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
    args = _common.parse_args(__doc__)

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
        _common.check_reload(model, small, plan, inputs, Path(tmp) / "bert_small")  # graphprune.save/load
    print(graphprune.benchmark(model, small, inputs, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
