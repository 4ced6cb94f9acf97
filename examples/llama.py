"""Compact a LLaMA-style decoder (grouped-query attention, SwiGLU, RMSNorm), then generate.

    python examples/llama.py            # ~100M-parameter config, 64 tokens
    python examples/llama.py --tiny     # tiny config and 8 tokens: a few seconds

Pruning keeps grouped-query attention valid: a kv head goes together with the q heads that share
it. graphprune updates ``model.config`` (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``), so the compact ``LlamaForCausalLM`` generates with its KV cache and
round-trips through ``save_pretrained`` / ``from_pretrained``. ONNX export and the benchmark use
the forward pass without cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import graphprune


def build(tiny: bool) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    if tiny:
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        seq = 8
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
        seq = 64
    ids = torch.randint(0, config.vocab_size, (1, seq))
    return LlamaForCausalLM(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config and input (smoke test)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--prune-hidden", action="store_true", help="also shrink the hidden size")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, inputs = build(args.tiny)
    small, plan = graphprune.compact_with_plan(
        model, inputs, ratio=args.ratio, prune_hidden=args.prune_hidden
    )
    print(plan)
    old, new = model.config, small.config
    print(f"{type(small).__name__}: q/kv heads {new.num_attention_heads}/{new.num_key_value_heads} "
          f"(was {old.num_attention_heads}/{old.num_key_value_heads}), MLP {new.intermediate_size} "
          f"(was {old.intermediate_size}), hidden {new.hidden_size}")

    with torch.no_grad():
        tokens = small.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("generate() with KV cache:", tokens[0, -5:].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, inputs, Path(tmp) / "llama_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        small.save_pretrained(Path(tmp) / "llama_small")
        again = LlamaForCausalLM.from_pretrained(Path(tmp) / "llama_small").eval()
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        logits, expected = again(**inputs).logits, small(**inputs).logits
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"save_pretrained -> from_pretrained: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
    print(graphprune.benchmark(model, small, inputs, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
