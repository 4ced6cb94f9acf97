"""Small built-in models: the shared test bed of the tests, the demo, the CLI and the benchmarks.

Every model here is written the way a user would write it (plain ``nn.Module`` classes, the usual
idioms: ``torch.flatten`` into a ``Linear``, ``torch.cat`` skips, ``chunk`` + channel shuffle,
squeeze-excitation as ``x * hardsigmoid(fc(pool(x)))``, hand-written attention with
``self.num_heads``/``self.head_dim``), because the engine must work on user code, not on code
written to please it. Nothing here imports torchvision or timm.

``build(name, size)`` returns ``(model, example_input)``:

* ``size="tiny"``: a few thousand parameters, inputs like ``2x3x32x32``; fast enough to trace,
  compact, export and verify dozens of times in a test run.
* ``size="bench"``: widths and depths of the real networks (ResNet-50 depth for ``resnet50``,
  MobileNetV2 at 224x224, ...), for latency benchmarks.

Models come back in ``eval()`` mode with deterministic weights (the global RNG is left alone), and
every norm layer has non-trivial running statistics and affine parameters: with the default
``running_mean=0, running_var=1, weight=1, bias=0`` a test could not tell a BatchNorm that was
sliced wrongly from one that was sliced right.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphprune.zoo.cnn import (
    MLP,
    VGG,
    BasicBlock,
    Bottleneck,
    DenseNet,
    MobileNetV2,
    MobileNetV3,
    ResNet,
    ShuffleNetV2,
    UNet,
)
from graphprune.zoo.vit import ViT

Size = str  # "tiny" | "bench"
Built = tuple[nn.Module, Any]

SIZES = ("tiny", "bench")


# --------------------------------------------------------------------------------------------
# Deterministic initialisation
# --------------------------------------------------------------------------------------------

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _randomize_norms(model: nn.Module, calibration_input: Any) -> None:
    """Give every norm layer non-trivial affine parameters and realistic running statistics.

    The affine parameters are drawn at random first (so that slicing the wrong BN channel
    changes the output); then the running statistics are measured by a forward pass in train
    mode over a calibration batch, so that activations keep a sane scale through deep nets in
    eval mode. (The other order lets the random scales compound: 1e28 logits on EfficientNet-B0.)
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)
            elif type(m).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(
                getattr(m, "weight", None), torch.Tensor
            ):  # hand-written / Hugging Face norms (ConvNext's channels-first LayerNorm, ...)
                m.weight.uniform_(0.5, 1.5)
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.normal_(0.0, 0.2)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics exactly
        model.train()
        with torch.no_grad():
            args, kwargs = _as_call(calibration_input)
            model(*args, **kwargs)
        for m, momentum in saved:
            m.momentum = momentum
    model.eval()


def _like(example_input: Any, batch: int) -> Any:
    """Fresh random inputs shaped like ``example_input`` with batch size ``batch``."""
    if isinstance(example_input, torch.Tensor):
        return torch.randn(batch, *example_input.shape[1:])
    if isinstance(example_input, dict):
        return {k: _like(v, batch) for k, v in example_input.items()}
    return tuple(_like(v, batch) for v in example_input)


def _as_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    return tuple(example_input), {}


def _finish(model: nn.Module, example_input: Any, calibration_input: Any | None = None) -> Built:
    """Randomise and calibrate norms, switch to eval mode, return ``(model, example_input)``.

    The calibration batch is drawn separately from the example input, so the running statistics
    are realistic but not tuned to the very batch the tests run.
    """
    if calibration_input is None:
        calibration_input = _like(example_input, 4)
    _randomize_norms(model, calibration_input)
    # Also give zero-initialised parameters (cls tokens, position embeddings) some content.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed")):
                p.normal_(0.0, 0.02)
    return model.eval(), example_input


def _image(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _vgg(size: Size) -> Built:
    if size == "tiny":
        return _finish(VGG([8, "M", 16, "M", 32, "M"], 32, hidden=32), _image(2, 32))
    cfg: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                            512, 512, 512, "M"]
    return _finish(VGG(cfg, 128, hidden=512, num_classes=1000), _image(1, 128))


def _resnet18(size: Size) -> Built:
    if size == "tiny":
        model = ResNet(BasicBlock, [2, 1, 1], [8, 16, 32], stem=8, small_stem=True)
        return _finish(model, _image(2, 32))
    model = ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], 64, False, num_classes=1000)
    return _finish(model, _image(1, 224))


def _resnet50(size: Size) -> Built:
    if size == "tiny":
        model = ResNet(Bottleneck, [2, 1], [4, 8], stem=8, small_stem=True)
        return _finish(model, _image(2, 32))
    model = ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 64, False, num_classes=1000)
    return _finish(model, _image(1, 224))


def _resnext(size: Size) -> Built:
    if size == "tiny":  # 4 groups of 4 (then 8) channels in the 3x3 convs
        model = ResNet(Bottleneck, [1, 1], [4, 8], 8, True, groups=4, width_per_group=64)
        return _finish(model, _image(2, 32))
    model = ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 64, False, num_classes=1000,
                   groups=32, width_per_group=4)  # ResNeXt-50 32x4d
    return _finish(model, _image(1, 224))


def _densenet(size: Size) -> Built:
    if size == "tiny":
        model = DenseNet([2, 2], growth=4, stem=8, bn_size=2, small_stem=True)
        return _finish(model, _image(2, 32))
    model = DenseNet([6, 12, 24, 16], growth=32, stem=64, bn_size=4, small_stem=False,
                     num_classes=1000)  # DenseNet-121
    return _finish(model, _image(1, 224))


def _mobilenetv2(size: Size) -> Built:
    if size == "tiny":
        settings = [(1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2)]
        return _finish(MobileNetV2(settings, stem=8, last=32), _image(2, 32))
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
    model = MobileNetV2(settings, stem=32, last=1280, num_classes=1000)
    return _finish(model, _image(1, 224))


def _mobilenetv3(size: Size) -> Built:
    # (kernel, expanded, out, squeeze-excitation kind, activation, stride)
    if size == "tiny":
        settings = [(3, 8, 8, "conv", "re", 1), (3, 24, 16, "none", "re", 2),
                    (5, 32, 16, "linear", "hs", 1), (5, 48, 24, "linear", "hs", 2)]
        return _finish(MobileNetV3(settings, stem=8, last=32, hidden=32), _image(2, 32))
    settings = [(3, 16, 16, "conv", "re", 2), (3, 72, 24, "none", "re", 2),
                (3, 88, 24, "none", "re", 1), (5, 96, 40, "conv", "hs", 2),
                (5, 240, 40, "conv", "hs", 1), (5, 240, 40, "linear", "hs", 1),
                (5, 120, 48, "linear", "hs", 1), (5, 144, 48, "conv", "hs", 1),
                (5, 288, 96, "conv", "hs", 2), (5, 576, 96, "conv", "hs", 1),
                (5, 576, 96, "conv", "hs", 1)]  # MobileNetV3-Small
    model = MobileNetV3(settings, stem=16, last=576, hidden=1024, num_classes=1000)
    return _finish(model, _image(1, 224))


def _shufflenetv2(size: Size) -> Built:
    if size == "tiny":
        model = ShuffleNetV2([16, 32], [2, 2], stem=8, last=32, small_stem=True)
        return _finish(model, _image(2, 32))
    model = ShuffleNetV2([116, 232, 464], [4, 8, 4], 24, 1024, False, num_classes=1000)  # x1.0
    return _finish(model, _image(1, 224))


def _unet(size: Size) -> Built:
    if size == "tiny":
        return _finish(UNet(base=8, depth=2), _image(2, 32))
    return _finish(UNet(base=64, depth=4), _image(1, 128))


def _mlp(size: Size) -> Built:
    if size == "tiny":
        return _finish(MLP(64, [32, 32]), torch.randn(2, 64))
    return _finish(MLP(784, [2048, 2048], num_classes=10), torch.randn(64, 784))


def _vit_tiny(size: Size) -> Built:
    if size == "tiny":
        model = ViT(32, 8, dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
        return _finish(model, _image(2, 32))
    model = ViT(224, 16, dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=1000)  # ViT-Ti
    return _finish(model, _image(1, 224))


ZOO: dict[str, Callable[..., Built]] = {
    "vgg": _vgg,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "resnext": _resnext,
    "densenet": _densenet,
    "mobilenetv2": _mobilenetv2,
    "mobilenetv3": _mobilenetv3,
    "shufflenetv2": _shufflenetv2,
    "unet": _unet,
    "mlp": _mlp,
    "vit_tiny": _vit_tiny,
}
"""name -> builder; ``ZOO[name]()`` gives the tiny ``(model, example_input)``, ``ZOO[name]("bench")``
the benchmark-sized one. Prefer :func:`build`, which also seeds the RNG."""

CNN_NAMES = ("vgg", "resnet18", "resnet50", "resnext", "densenet", "mobilenetv2", "mobilenetv3",
             "shufflenetv2", "unet")
MLP_NAMES = ("mlp",)
ATTENTION_NAMES = ("vit_tiny",)
HF_CNN_NAMES = ("hf_resnet", "hf_convnext", "hf_mobilenetv2", "hf_regnet", "hf_efficientnet")


def names() -> list[str]:
    """Every name :func:`build` accepts (Hugging Face ones need ``transformers``)."""
    return [*ZOO, *HF_CNN_NAMES]


def build(name: str, size: Size = "tiny", seed: int = 0) -> Built:
    """Build zoo model ``name`` at ``size`` ("tiny" or "bench"): ``(model in eval mode, input)``.

    Weights and input are the same on every call; the caller's global RNG state is restored
    afterwards, so building a model never perturbs the caller's own randomness.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if name in HF_CNN_NAMES:
        return hf_cnn(name, size, seed=seed)
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {', '.join(names())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ZOO[name](size)


# --------------------------------------------------------------------------------------------
# Hugging Face transformers CNNs (random weights, built from configs; transformers is optional)
# --------------------------------------------------------------------------------------------


def _hf_config(name: str, size: Size) -> tuple[Any, type, int]:
    """Return ``(config, model class, image size)``; imports transformers lazily."""
    try:
        import transformers as tf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{name} needs the optional dependency 'transformers' (pip install transformers)"
        ) from e

    tiny = size == "tiny"
    labels = 10 if tiny else 1000
    if name == "hf_resnet":
        cfg = (tf.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                               layer_type="bottleneck", num_labels=labels)
               if tiny else tf.ResNetConfig(num_labels=labels))  # default = ResNet-50
        return cfg, tf.ResNetForImageClassification, 32 if tiny else 224
    if name == "hf_convnext":
        cfg = (tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2,
                                 num_labels=labels, layer_scale_init_value=0.5, image_size=32)
               if tiny else tf.ConvNextConfig(num_labels=labels))  # default = ConvNeXt-T
        return cfg, tf.ConvNextForImageClassification, 32 if tiny else 224
    if name == "hf_mobilenetv2":
        cfg = (tf.MobileNetV2Config(depth_multiplier=0.1, expand_ratio=3.0, image_size=32, num_labels=labels,
                                    finegrained_output=False, classifier_dropout_prob=0.1)
               if tiny else tf.MobileNetV2Config(num_labels=labels))
        return cfg, tf.MobileNetV2ForImageClassification, 32 if tiny else 224
    if name == "hf_regnet":
        cfg = (tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                               groups_width=4, layer_type="y", num_labels=labels)
               if tiny else tf.RegNetConfig(num_labels=labels))
        return cfg, tf.RegNetForImageClassification, 32 if tiny else 224
    if name == "hf_efficientnet":
        if tiny:
            cfg = tf.EfficientNetConfig(
                image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320,
                kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
                strides=[1, 2, 2], num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6],
                depthwise_padding=[], dropout_rate=0.1, drop_connect_rate=0.0, num_labels=labels,
            )
        else:  # EfficientNet-B0 (the config's own default is B7)
            cfg = tf.EfficientNetConfig(image_size=224, width_coefficient=1.0,
                                        depth_coefficient=1.0, hidden_dim=1280,
                                        dropout_rate=0.2, num_labels=labels)
        return cfg, tf.EfficientNetForImageClassification, 32 if tiny else 224
    raise KeyError(f"unknown Hugging Face CNN {name!r}; choose one of {', '.join(HF_CNN_NAMES)}")


def hf_cnn(name: str, size: Size = "tiny", seed: int = 0) -> Built:
    """A Hugging Face image classifier with random weights, built from a config (no download).

    The example input is the keyword dict ``{"pixel_values": ...}``, the way HF models are called.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if not name.startswith("hf_"):
        name = f"hf_{name}"
    cfg, cls, image = _hf_config(name, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
        batch = 2 if size == "tiny" else 1
        x = {"pixel_values": _image(batch, image)}
        # HF initialisers leave BN/LN at weight=1, bias=0: make them non-trivial, as in the zoo.
        return _finish(model, x)


def describe(model: nn.Module) -> str:
    """One line: class name and parameter count (used by the CLI's model listing)."""
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({n / 1e6:.2f} M params)" if n >= 1e5 else (
        f"{type(model).__name__} ({n} params)")


__all__ = [
    "ATTENTION_NAMES",
    "CNN_NAMES",
    "HF_CNN_NAMES",
    "MLP_NAMES",
    "ZOO",
    "build",
    "describe",
    "hf_cnn",
    "names",
]
