"""Compact a LLaMA-style decoder (grouped-query attention, SwiGLU, RMSNorm), then generate.

    python examples/llama.py            # ~100M-parameter config, 64 tokens
    python examples/llama.py --tiny     # tiny config and 8 tokens: a few seconds
    python examples/llama.py --tiny --attention q_heads    # keep every kv head (and the KV cache)
    python examples/llama.py --tiny --attention head_dim   # keep every head, prune inside them

Pruning keeps grouped-query attention valid: by default a kv head goes together with the q heads
that share it; ``--attention q_heads`` removes q heads evenly within every kv group instead (the kv
cache keeps its size) and ``--attention head_dim`` removes channels inside every head (the rotary
channel pairs and their frequencies go together). graphprune updates ``model.config``
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) when ``LlamaConfig``
accepts the new values, so the compact
``LlamaForCausalLM`` generates with its KV cache and round-trips through ``save_pretrained`` /
``from_pretrained``; when it does not (LlamaConfig wants hidden_size % heads == 0; a pruned rotary
frequency table is not a config value either), the plan says
so and ``graphprune.save`` / ``graphprune.load`` store and rebuild the model instead. ONNX export
and the benchmark use the forward pass without cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common
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
    args = _common.parse_args(__doc__, prune_hidden=True, attention=True)

    torch.manual_seed(0)
    model, inputs = build(args.tiny)
    small, plan = graphprune.compact_with_plan(
        model, inputs, ratio=args.ratio, prune_hidden=args.prune_hidden, attention=args.attention
    )
    print(plan)
    for name, m in (("was", model), ("now", small)):  # read off the modules of layer 0
        attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        print(f"{name}: q/kv heads {attn.q_proj.out_features // attn.head_dim}/"
              f"{attn.k_proj.out_features // attn.head_dim} of {attn.head_dim}, "
              f"MLP {mlp.gate_proj.out_features}, "
              f"hidden {m.model.embed_tokens.embedding_dim}")

    with torch.no_grad():
        tokens = small.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("generate() with KV cache:", tokens[0, -5:].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, inputs, Path(tmp) / "llama_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        _common.check_reload(model, small, plan, inputs, Path(tmp) / "llama_small")
    print(graphprune.benchmark(model, small, inputs, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
