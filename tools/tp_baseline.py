"""Torch-Pruning baseline for ``tools/compare.py``: its documented recipe, applied generically.

The comparison is only worth something if Torch-Pruning (TP) is used the way its authors tell
people to use it, so this module follows TP 1.6's README and its ``examples/`` scripts
(``examples/transformers/prune_hf_vit.py``, ``prune_hf_bert.py``, ``examples/LLMs/prune_llm.py``):

1. ``imp = tp.importance.GroupMagnitudeImportance(p=2)`` (L2, like graphprune's default);
2. ``ignored_layers`` = the layers that produce the model's outputs (the README's ``[model.fc]``;
   here found automatically, see :func:`find_output_layers`, so no model needs a hand-written list);
3. for attention, ``num_heads={q/k/v projection: heads}`` with ``prune_num_heads=True``,
   ``prune_head_dims=False`` and ``head_pruning_ratio=ratio`` (the BERT/LLM examples: whole heads,
   head_dim untouched so rotary embeddings still fit);
4. ``tp.pruner.MetaPruner(model, example_inputs, ...)`` then ``pruner.step()``;
5. afterwards, the attribute patching the examples do by hand (``num_heads``,
   ``num_attention_heads``, ``num_key_value_heads``, ``num_key_value_groups``, ``all_head_size``...
   set from the pruned projection widths).

Nothing here checks the result: :func:`tools.compare` does that (the pruned model must run, keep
the original output shapes and have fewer parameters), so TP's failures are reported, not hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = [
    "HEAD_MODES", "call_model", "find_attention_heads", "find_output_layers", "flat_tensors",
    "has_attention", "prune_with_tp",
]

# Names under which attention modules keep their query/key/value projections (HF and hand-written).
_QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # ViT/DeiT/DINOv2/CLIP/Whisper/LLaMA/Qwen2/Mistral/Phi (HF 5.x)
    ("query", "key", "value"),  # BERT/RoBERTa/Swin/SegFormer/MobileViT
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
    ("q", "k", "v"),
)
_FUSED_QKV_NAMES: tuple[str, ...] = ("qkv", "qkv_proj", "in_proj")
_HEAD_ATTRS: tuple[str, ...] = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS: tuple[str, ...] = ("head_dim", "attention_head_size", "head_size")


def _as_tp_inputs(example_input: Any) -> Any:
    """TP calls ``model(*inputs)`` for non-dicts, so a bare tensor must be wrapped in a tuple.

    (Passing the bare tensor, as the README does with batch 1, makes TP call ``model(*x)`` = the
    model on ``x[0]`` first and only falls back to ``model(x)`` if that raises.)
    """
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, list):
        return tuple(example_input)
    return example_input


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(**x)`` for a dict, ``model(*x)`` for a tuple or list, else ``model(x)``.

    Also used by tools/compare.py, which runs every tool's model through this same neutral code.
    """
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output: tensors, dicts (HF ModelOutput), dataclasses, tuples, lists."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # includes HF ModelOutput
        return [t for v in out.values() for t in flat_tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flat_tensors(getattr(out, f.name))]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    return []


def find_output_layers(model: nn.Module, example_input: Any) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach a model output through parameter-free ops only.

    These are what the README puts in ``ignored_layers`` by hand (``[model.fc]``,
    ``[model.classifier]``, ``[model.lm_head]``): their output channels are the model's output
    size. Found by a forward pass with hooks, then a walk back along the autograd graph from each
    output that stops at the first such layer on every path.
    """
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
    grad_fn_to_module: dict[Any, nn.Module] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            grad_fn_to_module[output.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.enable_grad():
            out = call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [t.grad_fn for t in flat_tensors(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        module = grad_fn_to_module.get(fn)
        if module is not None:
            if all(module is not f for f in found):
                found.append(module)
            continue
        if type(fn).__name__ == "AccumulateGrad":  # reached a parameter without passing a layer
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions if next_fn is not None)
    return found


def _int_attr(module: nn.Module, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _config_int(module: nn.Module, names: Iterable[str]) -> int | None:
    config = getattr(module, "config", None)
    if config is None:
        return None
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_attention_heads(model: nn.Module) -> dict[nn.Module, dict[str, Any]]:
    """Attention modules with their q/k/v projections, head count and head size.

    Returns ``{attention_module: {"q": Linear, "k": Linear, "v": Linear, "heads": int,
    "kv_heads": int, "head_dim": int}}`` (``"qkv"`` instead of q/k/v for a fused projection).
    This is the information the TP examples pass as ``num_heads`` (q: attention heads, k/v:
    key-value heads for GQA).
    """
    found: dict[nn.Module, dict[str, Any]] = {}
    for module in model.modules():
        children = dict(module.named_children())
        heads = _int_attr(module, _HEAD_ATTRS) or _config_int(
            module, ("num_attention_heads", "encoder_attention_heads", "n_head", "n_heads")
        )
        if heads is None:
            continue
        for q_name, k_name, v_name in _QKV_NAMES:
            q, k, v = children.get(q_name), children.get(k_name), children.get(v_name)
            if all(isinstance(m, nn.Linear) for m in (q, k, v)):
                assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear)
                head_dim = _int_attr(module, _HEAD_DIM_ATTRS) or q.out_features // heads
                if q.out_features != heads * head_dim or k.out_features % head_dim:
                    break
                found[module] = {
                    "q": q, "k": k, "v": v, "heads": heads,
                    "kv_heads": k.out_features // head_dim, "head_dim": head_dim,
                }
                break
        else:
            for name in _FUSED_QKV_NAMES:
                qkv = children.get(name)
                if isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
                    found[module] = {
                        "qkv": qkv, "heads": heads, "kv_heads": heads,
                        "head_dim": qkv.out_features // (3 * heads),
                    }
                    break
    return found


def _patch_attention(attn: dict[nn.Module, dict[str, Any]], head_mode: str) -> None:
    """The examples' post-``step()`` fix-up: make head attributes match the pruned widths.

    ``head_mode="heads"``: head_dim is kept, the head counts shrink. ``"head_dims"``: the head
    counts are kept, head_dim shrinks.
    """
    for module, info in attn.items():
        if "qkv" in info:
            width = kv_width = info["qkv"].out_features // 3
        else:
            width, kv_width = info["q"].out_features, info["k"].out_features
        if head_mode == "heads":
            head_dim = info["head_dim"]
            heads, kv_heads = width // head_dim, kv_width // head_dim
        else:
            heads, kv_heads = info["heads"], info["kv_heads"]
            head_dim = width // heads
            for name in _HEAD_DIM_ATTRS:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, head_dim)
        for name in _HEAD_ATTRS:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, heads)
        if isinstance(getattr(module, "num_key_value_heads", None), int):
            module.num_key_value_heads = kv_heads
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = max(heads // max(kv_heads, 1), 1)
        for name in ("all_head_size", "inner_dim"):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, width)


HEAD_MODES = ("heads", "head_dims")


def has_attention(model: nn.Module) -> bool:
    """Whether :func:`prune_with_tp` will pass ``num_heads`` settings (so ``head_mode`` matters)."""
    return bool(find_attention_heads(model))


def prune_with_tp(model: nn.Module, example_input: Any, ratio: float,
                  head_mode: str = "heads", round_to: int | None = None) -> nn.Module:
    """Prune ``model`` *in place* with Torch-Pruning's documented recipe and return it.

    ``head_mode`` picks between the two attention settings TP's examples use: ``"heads"``
    (``prune_num_heads=True, prune_head_dims=False``: the BERT and LLM examples) and
    ``"head_dims"`` (``prune_num_heads=False, prune_head_dims=True``: the ViT example).
    ``round_to`` is TP's own option (kept widths rounded to a multiple), off by default as in the
    README's basic example.
    Callers pass a deep copy. Raises whatever TP raises; the caller decides whether the returned
    model is usable (runs, same output shapes, fewer parameters).
    """
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    model.eval()
    inputs = _as_tp_inputs(example_input)
    ignored = find_output_layers(model, inputs)
    attn = find_attention_heads(model)
    num_heads: dict[nn.Module, int] = {}
    for info in attn.values():
        if "qkv" in info:
            num_heads[info["qkv"]] = info["heads"]
        else:
            num_heads[info["q"]] = info["heads"]
            num_heads[info["k"]] = info["kv_heads"]
            num_heads[info["v"]] = info["kv_heads"]
    pruner = tp.pruner.MetaPruner(
        model,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=bool(num_heads) and head_mode == "heads",
        prune_head_dims=head_mode == "head_dims",
        head_pruning_ratio=ratio if num_heads and head_mode == "heads" else 0.0,
        round_to=round_to,
        # TP 1.6 mutates its default dict arguments (``out_channel_groups.update(num_heads)``);
        # fresh dicts keep one model's settings from leaking into the next pruner.
        in_channel_groups={},
        out_channel_groups={},
    )
    pruner.step()
    _patch_attention(attn, head_mode)
    return model
