"""Compact a LLaMA-style decoder (grouped-query attention, SwiGLU, RMSNorm), then generate.

    python examples/llama.py            # ~100M-parameter config, 64 tokens
    python examples/llama.py --tiny     # tiny config and 8 tokens: a few seconds

Pruning keeps grouped-query attention valid: a kv head goes together with the q heads that share
it. graphprune updates ``model.config`` (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``) when ``LlamaConfig`` accepts the new values, so the compact
``LlamaForCausalLM`` generates with its KV cache and round-trips through ``save_pretrained`` /
``from_pretrained``; when it does not (LlamaConfig wants hidden_size % heads == 0), the plan says
so and ``graphprune.save`` / ``graphprune.load`` store and rebuild the model instead. ONNX export
and the benchmark use the forward pass without cache.
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


def save_and_reload(model: LlamaForCausalLM, small: LlamaForCausalLM, plan: graphprune.Plan, path: Path):
    """``save_pretrained`` when graphprune could write the new widths into ``small.config``.

    Otherwise (the config class refuses them, e.g. LLaMA wants hidden_size % heads == 0) the
    weights and the plan go through ``graphprune.save`` and come back with ``graphprune.load`` on
    a freshly built base model of the original config.
    """
    if any(note.startswith("model.config updated") for note in plan.notes):
        small.save_pretrained(path)
        return LlamaForCausalLM.from_pretrained(path).eval(), "save_pretrained -> from_pretrained"
    graphprune.save(small, path, plan)
    return graphprune.load(path, LlamaForCausalLM(model.config)).eval(), "graphprune.save -> graphprune.load"


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
    for name, m in (("was", model), ("now", small)):  # read off the modules of layer 0
        attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        print(f"{name}: q/kv heads {attn.q_proj.out_features // attn.head_dim}/"
              f"{attn.k_proj.out_features // attn.head_dim}, MLP {mlp.gate_proj.out_features}, "
              f"hidden {m.model.embed_tokens.embedding_dim}")

    with torch.no_grad():
        tokens = small.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("generate() with KV cache:", tokens[0, -5:].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        result = graphprune.export_onnx(small, inputs, Path(tmp) / "llama_small.onnx")
        print(f"ONNX export ({result.exporter}) checked in onnxruntime: max rel err {result.max_rel_err:.1e}")
        again, how = save_and_reload(model, small, plan, Path(tmp) / "llama_small")
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        logits, expected = again(**inputs).logits, small(**inputs).logits
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"{how}: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
    print(graphprune.benchmark(model, small, inputs, runs=5 if args.tiny else 20))


if __name__ == "__main__":
    main()
