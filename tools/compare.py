"""graphprune vs Torch-Pruning, side by side: same models, same ratio, one run, one process.

    python tools/compare.py [--ratio 0.3] [--models a,b,...] [--runs N] [--quick]
                            [--json out.json] [--markdown] [--list]

For every model each tool gets a deep copy of the same randomly initialised model. A tool's result
counts as *compacted* only if it did not raise, the pruned model runs on the example input, every
output keeps its original shape, and the parameter count went down; anything else is *failed*,
with a one-line reason. Parameters and FLOPs are counted by the same neutral code for all models
(``torch.utils.flop_counter``), and latency is measured with onnxruntime on the exported ONNX
models of the original and of both pruned models, in the same process, with the same thread
settings and the runs interleaved (orig, gp, tp, orig, gp, tp, ...) so drifting machine load hits
all three alike. See tools/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tp_baseline import HEAD_MODES, call_model, flat_tensors, has_attention, prune_with_tp  # noqa: E402

TOOLS = ("graphprune", "torch-pruning")
Builder = Callable[[str], tuple[nn.Module, Any]]


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Input and model sizes for one run mode (``bench``: realistic, ``tiny``: smoke test)."""

    cnn_img: int  # HF CNN input side
    vit_img: int  # vision transformer input side
    patch: int
    seq: int
    hidden: int
    layers: int
    heads: int
    inter: int
    vocab: int


BENCH = Sizes(cnn_img=128, vit_img=224, patch=16, seq=128, hidden=256, layers=4, heads=4, inter=1024,
              vocab=2000)
TINY = Sizes(cnn_img=32, vit_img=32, patch=8, seq=16, hidden=64, layers=2, heads=4, inter=128,
             vocab=100)


def _sizes(size: str) -> Sizes:
    return TINY if size == "tiny" else BENCH


def _image(side: int) -> torch.Tensor:
    return torch.randn(1, 3, side, side)


def _text(s: Sizes, *, mask: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, s.vocab, (1, s.seq), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids}
    if mask:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def _hf_resnet(size: str) -> tuple[nn.Module, Any]:
    from transformers import ResNetConfig, ResNetForImageClassification

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = ResNetConfig(embedding_size=16 if tiny else 32,
                       hidden_sizes=[16, 32, 64, 128] if tiny else [64, 128, 256, 512],
                       depths=[1, 1, 1, 1] if tiny else [1, 2, 2, 1], layer_type="bottleneck",
                       num_labels=10)
    return ResNetForImageClassification(cfg), _image(s.cnn_img)


def _hf_convnext(size: str) -> tuple[nn.Module, Any]:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = ConvNextConfig(hidden_sizes=[16, 32, 64, 128] if tiny else [48, 96, 192, 384],
                         depths=[1, 1, 1, 1] if tiny else [1, 1, 3, 1], num_labels=10)
    return ConvNextForImageClassification(cfg), _image(s.cnn_img)


def _hf_mobilenetv2(size: str) -> tuple[nn.Module, Any]:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    s = _sizes(size)
    cfg = MobileNetV2Config(depth_multiplier=0.35 if size == "tiny" else 0.75,
                            image_size=s.cnn_img, num_labels=10)
    return MobileNetV2ForImageClassification(cfg), _image(s.cnn_img)


def _hf_regnet(size: str) -> tuple[nn.Module, Any]:
    from transformers import RegNetConfig, RegNetForImageClassification

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = RegNetConfig(embedding_size=16 if tiny else 32,
                       hidden_sizes=[16, 32, 64, 128] if tiny else [48, 104, 208, 440],
                       depths=[1, 1, 1, 1] if tiny else [1, 2, 4, 1], groups_width=8,
                       layer_type="y", num_labels=10)
    return RegNetForImageClassification(cfg), _image(s.cnn_img)


def _hf_efficientnet(size: str) -> tuple[nn.Module, Any]:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = EfficientNetConfig(width_coefficient=0.25 if tiny else 1.0,
                             depth_coefficient=0.25 if tiny else 1.0, image_size=s.cnn_img,
                             hidden_dim=320 if tiny else 1280, num_labels=10)
    return EfficientNetForImageClassification(cfg), _image(s.cnn_img)


def _vit_kwargs(s: Sizes) -> dict[str, Any]:
    return dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                intermediate_size=s.inter, image_size=s.vit_img, patch_size=s.patch, num_labels=10)


def _hf_vit(size: str) -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    s = _sizes(size)
    return ViTForImageClassification(ViTConfig(**_vit_kwargs(s))), _image(s.vit_img)


def _hf_deit(size: str) -> tuple[nn.Module, Any]:
    from transformers import DeiTConfig, DeiTForImageClassification

    s = _sizes(size)
    return DeiTForImageClassification(DeiTConfig(**_vit_kwargs(s))), _image(s.vit_img)


def _hf_dinov2(size: str) -> tuple[nn.Module, Any]:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    s = _sizes(size)
    kw = _vit_kwargs(s)
    kw.pop("intermediate_size")
    side = 28 if size == "tiny" else 224
    kw.update(patch_size=14, image_size=side, mlp_ratio=s.inter // s.hidden)
    return Dinov2ForImageClassification(Dinov2Config(**kw)), _image(side)


def _hf_clip(size: str) -> tuple[nn.Module, Any]:
    from transformers import CLIPConfig, CLIPForImageClassification

    s = _sizes(size)
    vision = _vit_kwargs(s)
    vision.pop("num_labels")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100)
    cfg = CLIPConfig(text_config=text, vision_config=vision, num_labels=10)
    return CLIPForImageClassification(cfg), _image(s.vit_img)


def _hf_swin(size: str) -> tuple[nn.Module, Any]:
    from transformers import SwinConfig, SwinForImageClassification

    tiny = size == "tiny"
    side = 32 if tiny else 224
    cfg = SwinConfig(image_size=side, patch_size=4, embed_dim=32 if tiny else 64,
                     depths=[1, 1] if tiny else [2, 2, 2, 2],
                     num_heads=[2, 4] if tiny else [2, 4, 8, 16], window_size=4 if tiny else 7,
                     num_labels=10)
    return SwinForImageClassification(cfg), _image(side)


def _hf_segformer(size: str) -> tuple[nn.Module, Any]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = SegformerConfig(hidden_sizes=[16, 32, 64, 128] if tiny else [32, 64, 160, 256],
                          depths=[1, 1, 1, 1] if tiny else [2, 2, 2, 2],
                          num_attention_heads=[1, 2, 4, 8] if tiny else [1, 2, 5, 8],
                          decoder_hidden_size=64 if tiny else 256, num_labels=5)
    return SegformerForSemanticSegmentation(cfg), _image(s.cnn_img)


def _hf_mobilevit(size: str) -> tuple[nn.Module, Any]:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    s = _sizes(size)
    tiny = size == "tiny"
    cfg = MobileViTConfig(image_size=s.cnn_img,
                          hidden_sizes=[32, 48, 64] if tiny else [64, 80, 96],
                          neck_hidden_sizes=([8, 16, 16, 24, 32, 48, 96] if tiny
                                             else [16, 16, 24, 48, 64, 80, 320]),
                          expand_ratio=2.0, num_labels=10)
    return MobileViTForImageClassification(cfg), _image(max(s.cnn_img, 64))


def _hf_bert(size: str) -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    s = _sizes(size)
    cfg = BertConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                     num_attention_heads=s.heads, intermediate_size=s.inter,
                     max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(cfg), _text(s)


def _hf_distilbert(size: str) -> tuple[nn.Module, Any]:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    s = _sizes(size)
    cfg = DistilBertConfig(vocab_size=s.vocab, dim=s.hidden, n_layers=s.layers, n_heads=s.heads,
                           hidden_dim=s.inter, max_position_embeddings=512, num_labels=2)
    return DistilBertForSequenceClassification(cfg), _text(s)


def _hf_roberta(size: str) -> tuple[nn.Module, Any]:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    s = _sizes(size)
    cfg = RobertaConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                        num_attention_heads=s.heads, intermediate_size=s.inter,
                        max_position_embeddings=514, num_labels=2)
    return RobertaForSequenceClassification(cfg), _text(s)


def _hf_gpt2(size: str) -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    s = _sizes(size)
    cfg = GPT2Config(vocab_size=s.vocab, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
                     n_inner=s.inter, n_positions=512, use_cache=False)
    return GPT2LMHeadModel(cfg), {**_text(s), "use_cache": False}


def _decoder_kwargs(s: Sizes) -> dict[str, Any]:
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                num_attention_heads=s.heads * 2, num_key_value_heads=2,
                intermediate_size=s.inter * 2 // 3, max_position_embeddings=512, use_cache=False)


def _hf_llama(size: str) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = _sizes(size)
    return LlamaForCausalLM(LlamaConfig(**_decoder_kwargs(s))), {**_text(s), "use_cache": False}


def _hf_qwen2(size: str) -> tuple[nn.Module, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = _sizes(size)
    return Qwen2ForCausalLM(Qwen2Config(**_decoder_kwargs(s))), {**_text(s), "use_cache": False}


def _hf_mistral(size: str) -> tuple[nn.Module, Any]:
    from transformers import MistralConfig, MistralForCausalLM

    s = _sizes(size)
    cfg = MistralConfig(**_decoder_kwargs(s), sliding_window=None)
    return MistralForCausalLM(cfg), {**_text(s), "use_cache": False}


def _hf_phi(size: str) -> tuple[nn.Module, Any]:
    from transformers import PhiConfig, PhiForCausalLM

    s = _sizes(size)
    cfg = PhiConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                    num_attention_heads=s.heads, intermediate_size=s.inter,
                    max_position_embeddings=512, partial_rotary_factor=0.5, use_cache=False)
    return PhiForCausalLM(cfg), {**_text(s), "use_cache": False}


def _hf_whisper(size: str) -> tuple[nn.Module, Any]:
    from transformers import WhisperConfig, WhisperForAudioClassification

    s = _sizes(size)
    frames = 32 if size == "tiny" else 200
    cfg = WhisperConfig(num_mel_bins=80, d_model=s.hidden, encoder_layers=s.layers,
                        encoder_attention_heads=s.heads, encoder_ffn_dim=s.inter,
                        decoder_layers=1, decoder_attention_heads=s.heads,
                        decoder_ffn_dim=s.inter, max_source_positions=frames // 2,
                        classifier_proj_size=64, num_labels=5, vocab_size=s.vocab)
    return WhisperForAudioClassification(cfg), torch.randn(1, 80, frames)


HF_MODELS: dict[str, Builder] = {
    "hf_resnet": _hf_resnet,
    "hf_convnext": _hf_convnext,
    "hf_mobilenetv2": _hf_mobilenetv2,
    "hf_regnet": _hf_regnet,
    "hf_efficientnet": _hf_efficientnet,
    "hf_vit": _hf_vit,
    "hf_deit": _hf_deit,
    "hf_dinov2": _hf_dinov2,
    "hf_clip_vision": _hf_clip,
    "hf_swin": _hf_swin,
    "hf_segformer": _hf_segformer,
    "hf_mobilevit": _hf_mobilevit,
    "hf_whisper_encoder": _hf_whisper,
    "hf_bert": _hf_bert,
    "hf_distilbert": _hf_distilbert,
    "hf_roberta": _hf_roberta,
    "hf_gpt2": _hf_gpt2,
    "hf_llama": _hf_llama,
    "hf_qwen2": _hf_qwen2,
    "hf_mistral": _hf_mistral,
    "hf_phi": _hf_phi,
}


# torchvision's classification models (random weights, ``torchvision.models.get_model``): name,
# input side at bench size. CNNs run at 128x128 like the zoo (they pool globally); the vision
# transformers need their 224x224 (fixed position embeddings / window grid). The largest
# variants (ResNet-152, RegNet-Y 128GF, ViT-H...) are left out to keep a full run within minutes.
TV_MODELS: dict[str, int] = {
    "alexnet": 128, "vgg11_bn": 128, "resnet18": 128, "resnet50": 128, "resnext50_32x4d": 128,
    "wide_resnet50_2": 128, "densenet121": 128, "googlenet": 128, "inception_v3": 128,
    "mobilenet_v2": 128, "mobilenet_v3_small": 128, "mobilenet_v3_large": 128, "mnasnet1_0": 128,
    "efficientnet_b0": 128, "efficientnet_v2_s": 128, "shufflenet_v2_x1_0": 128,
    "squeezenet1_1": 128, "regnet_x_400mf": 128, "regnet_y_400mf": 128, "convnext_tiny": 128,
    "swin_t": 224, "vit_b_16": 224, "maxvit_t": 224,
}


def import_torchvision() -> Any:
    """``import torchvision`` even where its compiled extension does not load.

    torchvision's Python package registers fake kernels for its detection ops at import and fails
    if the ops' schemas are missing (its C++ extension provides them). The classification models
    use none of those ops, so declaring the two schemas it checks (no kernels) is enough.
    """
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schemas only, on purpose
        for op in ("nms", "qnms"):
            with contextlib.suppress(RuntimeError):  # already declared by an earlier attempt
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.keep = lib  # type: ignore[attr-defined]  # keep the library alive
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # drop the half-imported package before importing it again
        import torchvision
    return torchvision


def _tv_builder(name: str, side: int) -> Builder:
    def build(size: str) -> tuple[nn.Module, Any]:
        tv = import_torchvision()
        kwargs: dict[str, Any] = {"weights": None, "num_classes": 10 if size == "tiny" else 1000}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        model = tv.models.get_model(name, **kwargs)
        px = side if size != "tiny" else (side if side == 224 else 64)
        return model, _image(px)

    return build


TV_BUILDERS: dict[str, Builder] = {f"tv_{n}": _tv_builder(n, side) for n, side in TV_MODELS.items()}


ZOO_MAX_SIDE = 128


def _smaller_image(model: nn.Module, x: Any) -> tuple[nn.Module, Any]:
    """Zoo ``bench`` CNNs take 224x224 images; time them at 128x128 where the model allows it.

    Keeps the default run within minutes on 2 cores (about 3x fewer FLOPs per image) while the
    networks keep their real widths and depths. Models tied to one input size (a flatten into a
    Linear, fixed position embeddings) keep their own input.
    """
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-1] > ZOO_MAX_SIDE
            and x.shape[-2] > ZOO_MAX_SIDE):
        return model, x
    small = torch.randn(*x.shape[:-2], ZOO_MAX_SIDE, ZOO_MAX_SIDE,
                        generator=torch.Generator().manual_seed(0))
    try:
        _call(model, small)
    except Exception:
        return model, x
    return model, small


def all_models() -> dict[str, Builder]:
    """graphprune.zoo's models (when the zoo is importable), the HF ones, then torchvision's."""
    models: dict[str, Builder] = {}
    try:
        from graphprune import zoo

        for name in zoo.ZOO:
            models[name] = (lambda size, _n=name: _smaller_image(*zoo.build(_n, size)))
    except Exception as exc:  # the zoo is written concurrently; run without it rather than die
        log(f"[compare] graphprune.zoo unavailable ({type(exc).__name__}: {exc}); HF models only")
    models.update(HF_MODELS)
    models.update(TV_BUILDERS)
    return models


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _call(model: nn.Module, example_input: Any) -> Any:
    with torch.no_grad():
        return call_model(model, example_input)


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights once): graphprune's counter, the same code for every model."""
    import graphprune

    return int(graphprune.count_params(model))


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward pass as torch's FlopCounterMode counts them (via graphprune.count_flops).

    It counts matmul/conv/attention kernels (the ops pruning shrinks) and ignores elementwise ops;
    the same counter is applied to the original and to both tools' models.
    """
    import graphprune

    return int(graphprune.count_flops(model, example_input))


def output_shapes(model: nn.Module, example_input: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in flat_tensors(_call(model, example_input))]


def check_pruned(model: nn.Module, example_input: Any, ref_shapes: list[tuple[int, ...]],
                 ref_params: int) -> None:
    """Raise ``RuntimeError('ran but broken: ...')`` unless the pruned model is usable."""
    try:
        shapes = output_shapes(model, example_input)
    except Exception as exc:
        raise RuntimeError(f"ran but broken: forward fails: {_one_line(exc)}") from exc
    if shapes != ref_shapes:
        raise RuntimeError(f"ran but broken: output shapes {shapes} != original {ref_shapes}")
    params = count_params(model)
    if params >= ref_params:
        raise RuntimeError(f"no parameters removed ({params} >= {ref_params})")


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def export(model: nn.Module, example_input: Any, path: str) -> str:
    """graphprune.export_onnx for all three models (TorchScript exporter, dynamo as fallback).

    ``check=False`` because :func:`onnx_mismatch` does the onnxruntime-vs-torch comparison itself
    and reports a mismatch as a note instead of dropping the model's latency.
    """
    import graphprune

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = graphprune.export_onnx(model, example_input, path, check=False)
    return str(result.exporter)


class OrtModel:
    """One onnxruntime session (graphprune's settings, fixed thread count) plus its feeds."""

    def __init__(self, path: str, example_input: Any, threads: int) -> None:
        from graphprune.export.onnx_export import flat_input_tensors, onnx_session

        self.session = onnx_session(path, threads=threads)
        tensors, names, _, _ = flat_input_tensors(example_input)
        wanted = [i.name for i in self.session.get_inputs()]
        by_name = dict(zip(names, tensors, strict=True))
        if all(w in by_name for w in wanted):  # exporters may drop unused inputs: map by name
            self.feeds = {w: by_name[w].detach().numpy() for w in wanted}
        elif len(wanted) <= len(tensors):
            self.feeds = {w: t.detach().numpy() for w, t in zip(wanted, tensors, strict=False)}
        else:
            raise RuntimeError(f"cannot map inputs {names} onto ONNX inputs {wanted}")

    def run(self) -> list[np.ndarray]:
        return self.session.run(None, self.feeds)


def onnx_mismatch(ort_model: OrtModel, torch_model: nn.Module, example_input: Any) -> float:
    """Largest relative difference between onnxruntime's and torch's outputs (0 = identical)."""
    ref = [t.detach().numpy() for t in flat_tensors(_call(torch_model, example_input))]
    got = ort_model.run()
    worst = 0.0
    for r, g in zip(ref, got, strict=False):
        if r.shape != g.shape:
            return math.inf
        scale = float(np.abs(r).max()) or 1.0
        worst = max(worst, float(np.abs(r - g).max()) / scale)
    return worst


def time_interleaved(models: dict[str, OrtModel], runs: int, warmup: int,
                     budget_s: float = math.inf, min_runs: int = 10,
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median latency (ms) of each session, and all samples; rounds run every model once, in
    rotating order.

    Stops after ``runs`` rounds, or earlier once ``min_runs`` rounds are done and ``budget_s``
    seconds have passed (heavy models have little run-to-run noise and cost the most time).
    """
    names = list(models)
    for _ in range(warmup):
        for name in names:
            models[name].run()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for i in range(runs):
        if i >= min_runs and time.perf_counter() - start > budget_s:
            break
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            models[name].run()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}, samples


# --------------------------------------------------------------------------------------------
# One model, both tools
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToolResult:
    tool: str
    ok: bool = False
    reason: str = ""
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    prune_s: float | None = None
    onnx_note: str = ""
    class_note: str = ""
    recipe_note: str = ""
    latency_samples_ms: list[float] = dataclasses.field(default_factory=list)

    def params_kept(self, orig: ModelResult) -> float | None:
        return None if self.params is None else self.params / orig.params

    def flops_kept(self, orig: ModelResult) -> float | None:
        return None if self.flops is None or not orig.flops else self.flops / orig.flops

    def speedup(self, orig: ModelResult) -> float | None:
        if self.latency_ms is None or orig.latency_ms is None:
            return None
        return orig.latency_ms / self.latency_ms

    def ideal(self, orig: ModelResult) -> float | None:
        return None if not self.flops or not orig.flops else orig.flops / self.flops

    def of_ideal(self, orig: ModelResult) -> float | None:
        s, i = self.speedup(orig), self.ideal(orig)
        return None if s is None or i is None else s / i


@dataclasses.dataclass
class ModelResult:
    name: str
    params: int = 0
    flops: int = 0
    latency_ms: float | None = None
    error: str = ""
    onnx_note: str = ""
    latency_samples_ms: list[float] = dataclasses.field(default_factory=list)
    tools: dict[str, ToolResult] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name, t in self.tools.items():
            out["tools"][name].update(params_kept=t.params_kept(self), flops_kept=t.flops_kept(self),
                                      speedup=t.speedup(self), ideal=t.ideal(self),
                                      speedup_of_ideal=t.of_ideal(self))
        return out


@dataclasses.dataclass
class Reference:
    """What a pruned model is checked against: the original's output shapes and size."""

    shapes: list[tuple[int, ...]]
    params: int


def _run_graphprune(model: nn.Module, x: Any, args: argparse.Namespace,
                    ref: Reference) -> tuple[nn.Module, str]:
    import graphprune

    kwargs: dict[str, Any] = {"prune_hidden": True} if args.gp_prune_hidden else {}
    if args.gp_attention != "heads":
        kwargs["attention"] = args.gp_attention
    if args.round_to:
        kwargs["round_to"] = args.round_to
    elif args.gp_round_to is not None:
        kwargs["round_to"] = args.gp_round_to
    small = graphprune.compact(model, x, ratio=args.ratio, **kwargs)
    check_pruned(small, x, ref.shapes, ref.params)
    return small, ""


def _run_tp(model: nn.Module, x: Any, args: argparse.Namespace,
            ref: Reference) -> tuple[nn.Module, str]:
    """TP's recipe with whole-head pruning; for attention models that fail, the ViT example's
    head_dim pruning gets a second chance (TP's best documented result is what is reported).

    TP's recipe prunes every group outside ``ignored_layers``, the hidden size included.
    """
    modes = HEAD_MODES if has_attention(model) else HEAD_MODES[:1]
    errors: list[str] = []
    for mode in modes:
        try:
            small = prune_with_tp(copy.deepcopy(model), x, args.ratio, head_mode=mode,
                                  round_to=args.round_to)
            check_pruned(small, x, ref.shapes, ref.params)
            note = "" if len(modes) == 1 else f"TP recipe: {mode}"
            if errors:
                note += f" (after {errors[0][:80]})"
            return small, note
        except ToolTimeout:
            raise
        except Exception as exc:
            if len(modes) == 1:
                raise
            errors.append(f"{mode}: {_one_line(exc, 120)}")
    raise RuntimeError(" | ".join(errors))


RUNNERS = {"graphprune": _run_graphprune, "torch-pruning": _run_tp}


class ToolTimeout(Exception):
    """A tool ran past ``--timeout`` on one model (Torch-Pruning can spin for a very long time)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`ToolTimeout` in this (main) thread after ``seconds``; 0 disables the limit.

    SIGALRM interrupts pure-Python loops, which is where a pruner gets stuck on a large graph.
    """
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise ToolTimeout(f"timed out after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # Re-fire every 2 s: a bare ``except:`` inside the tool may swallow the first alarm.
    signal.setitimer(signal.ITIMER_REAL, seconds, 2.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compare_model(name: str, builder: Builder, args: argparse.Namespace,
                  workdir: str) -> ModelResult:
    """Build one model, prune it with both tools, count, export and time all three."""
    res = ModelResult(name)
    torch.manual_seed(0)
    try:
        model, x = builder(args.size)
        model.eval()
        res.params = count_params(model)
        ref = Reference(output_shapes(model, x), res.params)
        res.flops = count_flops(model, x)
    except Exception as exc:
        res.error = f"could not build/run the original: {_one_line(exc)}"
        log(f"  {res.error}")
        return res
    log(f"  original: {res.params / 1e6:.2f} M params, {res.flops / 1e9:.3f} GFLOPs")

    pruned: dict[str, nn.Module] = {}
    for tool in args.tools:
        tr = ToolResult(tool)
        res.tools[tool] = tr
        t0 = time.perf_counter()
        try:
            with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
                  time_limit(args.timeout)):
                warnings.simplefilter("ignore")
                small, tr.recipe_note = RUNNERS[tool](model, x, args, ref)
            tr.prune_s = time.perf_counter() - t0
            small.eval()
            tr.params = count_params(small)
            tr.flops = count_flops(small, x)
            tr.ok = True
            if type(small) is not type(model):
                tr.class_note = f"returned a {type(small).__name__}, not {type(model).__name__}"
            pruned[tool] = small
            log(f"  {tool}: compacted in {tr.prune_s:.1f}s, params kept "
                f"{tr.params / res.params:.2f}, FLOPs kept {tr.flops / max(res.flops, 1):.2f}")
        except Exception as exc:
            tr.prune_s = tr.prune_s or time.perf_counter() - t0
            tr.reason = _one_line(exc)
            log(f"  {tool}: FAILED: {tr.reason}")
            if args.verbose:
                traceback.print_exc(file=sys.stderr)

    if args.runs <= 0:
        return res
    sessions: dict[str, OrtModel] = {}
    for key, mdl, holder in [("original", model, res), *[(t, m, res.tools[t]) for t, m in
                                                           pruned.items()]]:
        path = os.path.join(workdir, f"{name}.{key}.onnx")
        try:
            exporter = export(mdl, x, path)
            ort_model = OrtModel(path, x, args.threads)
            err = onnx_mismatch(ort_model, mdl, x)
            notes = [] if exporter == "torchscript" else [f"{exporter} exporter"]
            if err > 1e-3:
                notes.append(f"onnxruntime != torch (rel err {err:.1e})")
            holder.onnx_note = ", ".join(notes)
            sessions[key] = ort_model
        except Exception as exc:
            holder.onnx_note = f"no latency: {_one_line(exc, 120)}"
            log(f"  {key}: {holder.onnx_note}")
    if "original" not in sessions:
        return res
    log(f"  timing {', '.join(sessions)} ({args.runs} interleaved runs)")
    medians, samples = time_interleaved(sessions, args.runs, args.warmup, args.time_budget)
    res.latency_ms = medians.pop("original")
    res.latency_samples_ms = [round(v, 4) for v in samples.pop("original")]
    for tool, ms in medians.items():
        res.tools[tool].latency_ms = ms
        res.tools[tool].latency_samples_ms = [round(v, 4) for v in samples[tool]]
    return res


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def model_table(res: ModelResult) -> str:
    """The per-model block: one row per tool."""
    head = (f"== {res.name} ==  original: {res.params / 1e6:.2f} M params, "
            f"{res.flops / 1e9:.3f} GFLOPs, {_fmt(res.latency_ms, '.2f', ' ms')}")
    if res.error:
        return f"== {res.name} ==  {res.error}"
    rows = [f"{'tool':<14} {'result':<9} {'params':>6} {'FLOPs':>6} {'latency':>10} "
            f"{'speed-up':>8} {'ideal':>6} {'/ideal':>6} {'prune':>6}  note"]
    for t in res.tools.values():
        notes = (t.class_note, t.recipe_note, t.onnx_note)
        note = t.reason if not t.ok else "; ".join(n for n in notes if n)
        rows.append(
            f"{t.tool:<14} {'compacted' if t.ok else 'FAILED':<9} "
            f"{_fmt(t.params_kept(res), '.2f'):>6} {_fmt(t.flops_kept(res), '.2f'):>6} "
            f"{_fmt(t.latency_ms, '.2f', ' ms'):>10} {_fmt(t.speedup(res), '.2f', 'x'):>8} "
            f"{_fmt(t.ideal(res), '.2f', 'x'):>6} {_fmt(t.of_ideal(res), '.2f'):>6} "
            f"{_fmt(t.prune_s, '.1f', 's'):>6}  {note}")
    return "\n".join([head, *rows])


def _speed_checks(results: list[ModelResult], tools: tuple[str, ...]) -> str:
    """The speed bar graphprune is held to (issue 15): never slower than the original, and not
    more than 5 % behind Torch-Pruning's speed-up/ideal on the same model in the same run."""
    if "graphprune" not in tools:
        return ""
    timed = [r for r in results if not r.error and r.tools.get("graphprune") and r.tools["graphprune"].ok
             and r.tools["graphprune"].speedup(r) is not None]
    slower = [r.name for r in timed if (r.tools["graphprune"].speedup(r) or 0) < 1.0]
    behind = []
    for r in timed:
        tp = r.tools.get("torch-pruning")
        gp_eff, tp_eff = r.tools["graphprune"].of_ideal(r), tp.of_ideal(r) if tp and tp.ok else None
        if gp_eff is not None and tp_eff is not None and gp_eff < 0.95 * tp_eff:
            behind.append(r.name)
    return (f"graphprune slower than the original on {len(slower)}/{len(timed)}"
            + (f" ({', '.join(slower)})" if slower else "")
            + f"; more than 5% behind Torch-Pruning's speed-up/ideal on {len(behind)}"
            + (f" ({', '.join(behind)})" if behind else ""))


def summary(results: list[ModelResult], tools: tuple[str, ...]) -> str:
    built = [r for r in results if not r.error]
    parts = []
    for tool in tools:
        ok = [r for r in built if r.tools.get(tool) and r.tools[tool].ok]
        ratios = [r.tools[tool].of_ideal(r) for r in ok]
        ratios = [v for v in ratios if v is not None]
        speed = [r.tools[tool].speedup(r) for r in ok]
        speed = [v for v in speed if v is not None]
        extra = ""
        if speed:
            extra = (f" (median speed-up {statistics.median(speed):.2f}x, "
                     f"median speed-up/ideal {statistics.median(ratios):.2f})")
        parts.append(f"{tool} compacted {len(ok)}/{len(built)} models{extra}")
    checks = _speed_checks(results, tools)
    return "SUMMARY: " + "; ".join(parts) + (f"\nSPEED: {checks}" if checks else "")


def markdown(results: list[ModelResult], tools: tuple[str, ...], ratio: float) -> str:
    """One row per model, both tools side by side, for the project README."""
    cols = ["model", "orig ms"]
    for tool in tools:
        cols += [f"{tool}", "params", "FLOPs", "ms", "speed-up", "/ideal"]
    lines = [f"ratio {ratio}; params/FLOPs = fraction kept; speed-up = original ms / pruned ms "
             "(onnxruntime, CPU); /ideal = speed-up / (original FLOPs / pruned FLOPs)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | build failed |" + " |" * (len(cols) - 2))
            continue
        cells = [r.name, _fmt(r.latency_ms, ".2f")]
        for tool in tools:
            t = r.tools.get(tool)
            if t is None or not t.ok:
                reason = (t.reason if t else "not run").replace("|", "/")
                cells += [f"failed: {reason[:70]}", "", "", "", "", ""]
                continue
            cells += ["ok", _fmt(t.params_kept(r), ".2f"), _fmt(t.flops_kept(r), ".2f"),
                      _fmt(t.latency_ms, ".2f"), _fmt(t.speedup(r), ".2f", "x"),
                      _fmt(t.of_ideal(r), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", summary(results, tools)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _gp_round_to(text: str) -> int | str:
    """``--gp-round-to``: graphprune's own parser (imports graphprune alone: no transformers, no
    torchvision, so the torchvision set-up in main still runs first)."""
    from graphprune.cli.common import parse_round_to

    return parse_round_to(text, flag="--gp-round-to")


def select_models(spec: str, models: dict[str, Builder]) -> tuple[list[str], list[str]]:
    """``--models`` entries: names or shell patterns (``tv_*``, ``hf_*``). Returns (names, unmatched)."""
    import fnmatch

    names: list[str] = []
    missing: list[str] = []
    for item in (t.strip() for t in spec.split(",")):
        if not item:
            continue
        hits = fnmatch.filter(models, item) if any(c in item for c in "*?[") else (
            [item] if item in models else [])
        if not hits:
            missing.append(item)
        names += [h for h in hits if h not in names]
    return (names or ([] if missing else list(models))), missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of units removed (0.3)")
    p.add_argument("--models", default="",
                   help="comma-separated model names or patterns such as 'tv_*' (default: all)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed onnxruntime runs per model (default 30, --quick 20; 0 = no timing)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5)")
    p.add_argument("--time-budget", type=float, default=15.0,
                   help="seconds of timing per model after which rounds stop early (>= 10 rounds)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads, same for every model (default 1: on a shared "
                        "machine multi-threaded runs measure the scheduler more than the model)")
    p.add_argument("--round-to", type=int, default=None,
                   help="both tools round kept widths to a multiple of this (graphprune round_to=, "
                        "TP round_to=); default: each tool's own default (graphprune 'auto', TP off)")
    p.add_argument("--gp-round-to", type=_gp_round_to, default=None,
                   help="graphprune's round_to only ('auto', or 1 for exact widths); default: "
                        "graphprune's default ('auto')")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one tool may spend pruning one model before it counts as failed "
                        "(default 120, --quick 30)")
    p.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke test")
    p.add_argument("--tools", default=",".join(TOOLS), help="subset of: " + ",".join(TOOLS))
    p.add_argument("--gp-prune-hidden", action="store_true",
                   help="graphprune with prune_hidden=True (TP's recipe prunes the hidden size)")
    p.add_argument("--gp-attention", choices=("heads", "q_heads", "head_dim"), default="heads",
                   help="graphprune's attention= mode (Torch-Pruning keeps its own recipe)")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--markdown", action="store_true", help="also print one markdown table")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)
    args.size = "tiny" if args.quick else "bench"
    if args.runs is None:
        args.runs = 20 if args.quick else 30
    if args.warmup is None:
        args.warmup = 5
    if args.timeout is None:
        args.timeout = 30.0 if args.quick else 120.0
    args.tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown:
        p.error(f"unknown tool(s) {unknown}; choose from {TOOLS}")
    if not 0.0 <= args.ratio < 1.0:
        p.error("--ratio must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = all_models()
    if args.list:
        print("\n".join(models))
        return 0
    names, missing = select_models(args.models, models)
    if missing:
        log(f"unknown model(s): {', '.join(missing)}; --list shows the choices")
        return 2
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("torchvision") is not None:
        # before any transformers import: transformers imports an installed torchvision itself
        # (image processors), and fails where its extension is broken unless this runs first
        with contextlib.suppress(ImportError):
            import_torchvision()
    print(f"graphprune vs Torch-Pruning: ratio {args.ratio}, {'tiny' if args.quick else 'bench'} "
          f"sizes, onnxruntime {args.threads} thread(s), up to {args.runs} interleaved runs, median"
          + (f", round_to {args.round_to}" if args.round_to else
             f", graphprune round_to {args.gp_round_to or 'auto (its default)'}, Torch-Pruning's default"))
    results: list[ModelResult] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gp_compare_") as workdir:
        for i, name in enumerate(names, 1):
            log(f"[{i}/{len(names)}] {name}")
            t0 = time.perf_counter()
            try:
                res = compare_model(name, models[name], args, workdir)
            except Exception as exc:  # never let one model end the run
                res = ModelResult(name, error=f"harness error: {_one_line(exc)}")
            results.append(res)
            print(model_table(res), flush=True)
            print(flush=True)
            log(f"  ({time.perf_counter() - t0:.0f}s)")
            for f in Path(workdir).glob("*"):
                f.unlink()
    print(summary(results, args.tools))
    print(f"total time {time.perf_counter() - start:.0f}s")
    if args.markdown:
        print()
        print(markdown(results, args.tools, args.ratio))
    if args.json:
        payload = {"ratio": args.ratio, "size": args.size, "runs": args.runs,
                   "round_to": args.round_to, "gp_round_to": args.gp_round_to or "auto",
                   "gp_prune_hidden": args.gp_prune_hidden,
                   "threads": args.threads, "torch": torch.__version__,
                   "models": [r.to_json() for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
