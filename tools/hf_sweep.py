"""Compact many Hugging Face architectures graphprune was never written for, each in a fresh process.

    python tools/hf_sweep.py --kind causal                  # tiny causal LMs of many model types
    python tools/hf_sweep.py --kind seq2seq --models t5,bart
    python tools/hf_sweep.py --kind vision --json out.jsonl

Each model is built from ``AutoConfig.for_model(type)`` with small sizes (random weights: nothing
is downloaded), compacted at ``--ratio`` with the defaults (``verify=True``), then run once (and
``generate`` for decoders). Per model it prints: ok / fail / build_fail, params kept, seconds,
graphprune's warnings, and whether the user's model was changed (it must never be). A
``build_fail`` is the tiny config's fault (a field the family spells otherwise), not graphprune's.
Mixtures of experts are compacted as the user would get them: with transformers' default experts
path (a custom op, so their experts stay whole) unless ``--experts batched_mm``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any

KINDS: dict[str, list[str]] = {
    "causal": ("gemma gemma2 gemma3_text qwen3 qwen3_moe mixtral olmo olmo2 olmo3 gpt_neox opt bloom "
               "starcoder2 stablelm cohere cohere2 granite helium mamba gpt_bigcode persimmon nemotron "
               "internlm3 ministral exaone4 seed_oss apertus arcee olmoe qwen2_moe jetmoe granitemoe "
               "phimoe ernie4_5 hunyuan_v1_dense lfm2 vaultgemma xglm biogpt mpt ctrl gpt_oss bitnet "
               "diffllama doge falcon_h1 llama4_text").split(),
    "seq2seq": ("t5 mt5 umt5 bart mbart marian pegasus m2m_100 blenderbot nllb-moe longt5 plbart "
                "prophetnet").split(),
    "encoder": ("bert roberta electra albert deberta deberta-v2 mpnet xlm-roberta distilbert camembert "
                "modernbert ernie big_bird convbert squeezebert mobilebert nystromformer yoso roformer "
                "rembert luke canine layoutlm markuplm esm megatron-bert xlnet fnet ibert").split(),
    "vision": ("beit bit cvt data2vec-vision dinov2 dinov2_with_registers efficientnet focalnet hgnet_v2 "
               "ijepa mobilenet_v1 mobilenet_v2 mobilevit mobilevitv2 poolformer pvt pvt_v2 regnet resnet "
               "segformer swiftformer swinv2 textnet vit vit_msn").split(),
}
# small sizes, set on a config only where the family has the field
SMALL = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 16,
    "moe_intermediate_size": 32, "num_experts": 8, "num_local_experts": 8,
    "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "d_model": 64, "ffn_dim": 128,
    "num_layers": 2, "num_decoder_layers": 2, "encoder_layers": 2, "decoder_layers": 2, "d_ff": 128,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "d_kv": 16,
}


def _config(kind: str, model_type: str) -> Any:
    from transformers import AutoConfig

    if kind == "vision":
        cfg = AutoConfig.for_model(model_type, num_labels=3)
        for key, value in (("num_hidden_layers", 2), ("image_size", 64)):
            if hasattr(cfg, key):
                setattr(cfg, key, value)
        return cfg
    if kind == "causal":  # for_model validates these together (head_dim, kv heads)
        cfg = AutoConfig.for_model(model_type, **{k: SMALL[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "head_dim")})
    else:
        cfg = AutoConfig.for_model(model_type, **({"num_labels": 3} if kind == "encoder" else {}))
    for key, value in SMALL.items():
        if key in vars(cfg) and key != "head_dim":
            setattr(cfg, key, value)
    if kind != "causal":
        cfg.pad_token_id = 0
        cfg.decoder_start_token_id = 0
    return cfg


def _build(kind: str, model_type: str, experts: str | None) -> tuple[Any, dict[str, Any]]:
    import torch
    import transformers

    auto = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "encoder": transformers.AutoModelForSequenceClassification,
            "vision": transformers.AutoModelForImageClassification}[kind]
    torch.manual_seed(0)
    model = auto.from_config(_config(kind, model_type)).eval()
    if experts and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(experts)
        except Exception:  # noqa: BLE001 - a model without routed experts
            pass
    if kind == "vision":
        return model, {"pixel_values": torch.randn(2, getattr(model.config, "num_channels", 3), 64, 64)}
    ids = torch.randint(1, 64, (2, 8))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        x["decoder_input_ids"] = torch.randint(1, 64, (2, 5))
    return model, x


def run_one(kind: str, model_type: str, ratio: float, experts: str | None) -> dict[str, Any]:
    """Build, compact and run one model (in this process)."""
    import torch

    out: dict[str, Any] = {"model": model_type, "kind": kind}
    try:
        model, x = _build(kind, model_type, experts)
        with torch.no_grad():
            model(**x)
    except Exception as exc:  # noqa: BLE001 - the tiny config, not graphprune
        return {**out, "status": "build_fail", "error": f"{type(exc).__name__}: {exc}"[:300]}
    import graphprune

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small = graphprune.compact(model, x, ratio=ratio)
        out["seconds"] = round(time.perf_counter() - start, 2)
        out["params_kept"] = round(graphprune.count_params(small) / graphprune.count_params(model), 3)
        out["warnings"] = sorted({str(w.message)[:200] for w in caught if "graphprune" in str(w.message)})
        out["user_model_changed"] = [k for k, v in model.state_dict().items()
                                     if not torch.equal(v, before[k])]
        with torch.no_grad():
            small(**x)
            if kind in ("causal", "seq2seq"):
                small.generate(x["input_ids"][:1], max_new_tokens=3, do_sample=False)
        out["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported per model
        out.update(status="fail", error=f"{type(exc).__name__}: {exc}"[:400],
                   where=traceback.format_exc()[-600:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=sorted(KINDS), default="causal")
    p.add_argument("--models", default="", help="comma-separated model types (default: the kind's list)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--experts", default=None, help="transformers experts implementation, e.g. batched_mm")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per model process")
    p.add_argument("--json", default="", help="append one JSON line per model here")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], args.worker[1], args.ratio, args.experts)))
        return
    models = [m for m in args.models.split(",") if m] or KINDS[args.kind]
    counts: dict[str, int] = {}
    for model_type in models:
        cmd = [sys.executable, __file__, "--worker", args.kind, model_type, "--ratio", str(args.ratio)]
        if args.experts:
            cmd += ["--experts", args.experts]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"model": model_type, "status": "crash",
                                                       "error": done.stderr[-300:]}
        except subprocess.TimeoutExpired:
            res = {"model": model_type, "status": "timeout"}
        counts[res["status"]] = counts.get(res["status"], 0) + 1
        shown = res.get("error", "")[:160] or "; ".join(res.get("warnings", []))[:160]
        print(f"{model_type:24s} {res['status']:10s} params {res.get('params_kept', '-')!s:6s} "
              f"{res.get('seconds', '-')!s:6s}s changed={bool(res.get('user_model_changed'))} {shown}",
              flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    print("totals:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
