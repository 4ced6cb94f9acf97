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
import torch.nn.functional as F
from torch import nn

Size = str  # "tiny" | "bench"
Built = tuple[nn.Module, Any]

SIZES = ("tiny", "bench")


# --------------------------------------------------------------------------------------------
# VGG: plain conv stack + BN + max-pool, flattened straight into a Linear
# --------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG with BatchNorm. ``cfg`` lists conv widths, ``"M"`` is a 2x2 max-pool.

    The classifier flattens the last feature map into a ``Linear`` (no global pooling), so every
    channel of the last conv owns a block of ``H*W`` input features of ``fc1``.
    """

    def __init__(
        self, cfg: list[int | str], image_size: int, hidden: int, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, spatial = 3, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                spatial //= 2
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(True)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(in_ch * spatial * spatial, hidden)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc2(x)


# --------------------------------------------------------------------------------------------
# ResNet family: basic blocks, bottlenecks, grouped bottlenecks (ResNeXt)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs and an identity (or 1x1-conv downsample) shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, **_: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 / ResNeXt block: 1x1 reduce, 3x3 (optionally grouped), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, groups: int = 1, width_per_group: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet / ResNeXt trunk. ``small_stem`` uses a 3x3 stride-1 stem (CIFAR style, for 32x32)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        planes: list[int],
        stem: int,
        small_stem: bool,
        num_classes: int = 10,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        if small_stem:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_ch = stem
        stages = []
        for i, (n, p) in enumerate(zip(layers, planes, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, p, stride, groups=groups, width_per_group=width_per_group))
                in_ch = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# DenseNet: concatenating dense layers, transitions that shrink channels and resolution
# --------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; the caller concatenates the result onto its input."""

    def __init__(self, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(F.relu(self.norm(x))))


class DenseNet(nn.Module):
    def __init__(
        self,
        blocks: list[int],
        growth: int,
        stem: int,
        bn_size: int,
        small_stem: bool,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if small_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        stages: list[nn.Module] = []
        ch = stem
        for i, n in enumerate(blocks):
            stages.append(DenseBlock(n, ch, growth, bn_size))
            ch += n * growth
            if i != len(blocks) - 1:
                stages.append(Transition(ch, ch // 2))
                ch //= 2
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(ch)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.features(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (inverted residual, depthwise, ReLU6) and a MobileNetV3-ish net with SE
# --------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    def __init__(
        self, in_ch: int, out_ch: int, k: int = 3, stride: int = 1, groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU6,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self, settings: list[tuple[int, int, int, int]], stem: int, last: int, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2)]
        in_ch = stem
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(ConvBNAct(in_ch, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


class SqueezeExcite(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(mean(x)))))`` with Linear layers and a view back to 4-D."""

    def __init__(self, ch: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(ch, squeeze)
        self.fc2 = nn.Linear(squeeze, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        s = x.mean(dim=(2, 3))
        s = self.fc2(F.relu(self.fc1(s)))
        return x * F.hardsigmoid(s).view(b, c, 1, 1)


class ConvSqueezeExcite(nn.Module):
    """The torchvision-style SE: 1x1 convs on the pooled map, ``x * hardsigmoid(...)``."""

    def __init__(self, ch: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class MBv3Block(nn.Module):
    """MobileNetV3 block: expand, depthwise (k x k), optional SE, project; residual if possible."""

    def __init__(
        self, in_ch: int, k: int, exp: int, out_ch: int, se: str, act: str, stride: int
    ) -> None:
        super().__init__()
        act_cls: type[nn.Module] = nn.Hardswish if act == "hs" else nn.ReLU
        self.use_res = stride == 1 and in_ch == out_ch
        self.expand = ConvBNAct(in_ch, exp, 1, act=act_cls) if exp != in_ch else nn.Identity()
        self.dw = ConvBNAct(exp, exp, k, stride, groups=exp, act=act_cls)
        squeeze = _make_divisible(exp // 4)
        self.se: nn.Module
        if se == "linear":
            self.se = SqueezeExcite(exp, squeeze)
        elif se == "conv":
            self.se = ConvSqueezeExcite(exp, squeeze)
        else:
            self.se = nn.Identity()
        self.project = ConvBNAct(exp, out_ch, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.use_res else out


class MobileNetV3(nn.Module):
    def __init__(
        self, settings: list[tuple[int, int, int, str, str, int]], stem: int, last: int,
        hidden: int, num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, 2, act=nn.Hardswish)
        blocks = []
        in_ch = stem
        for k, exp, out, se, act, s in settings:
            blocks.append(MBv3Block(in_ch, k, exp, out, se, act, s))
            in_ch = out
        self.blocks = nn.Sequential(*blocks)
        self.last = ConvBNAct(in_ch, last, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------
# ShuffleNetV2: chunk / cat / channel shuffle
# --------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups: view -> transpose -> reshape, as ShuffleNet writes it."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.reshape(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_ch // 2
        if stride > 1:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
            b2_in = in_ch
        else:
            self.branch1 = nn.Identity()
            b2_in = branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(b2_in, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self, stages: list[int], repeats: list[int], stem: int, last: int, small_stem: bool,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        stride = 1 if small_stem else 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        units: list[nn.Module] = []
        for out_ch, n in zip(stages, repeats, strict=True):
            units.append(ShuffleUnit(in_ch, out_ch, 2))
            units += [ShuffleUnit(out_ch, out_ch, 1) for _ in range(n - 1)]
            in_ch = out_ch
        self.stages = nn.Sequential(*units)
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# --------------------------------------------------------------------------------------------
# UNet: encoder-decoder with ConvTranspose2d and skip concatenations
# --------------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, base: int, depth: int, num_classes: int = 2) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(3, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_convs = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            x = up(x)
            x = conv(torch.cat([skips.pop(), x], dim=1))
        return self.outc(x)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear / ReLU / Dropout stack, no normalisation."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(0.1)]
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------------------------
# ViT: hand-written attention with hard-coded head reshapes (for the attention work)
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """timm-style attention: the head split is a reshape using ``self.num_heads``/``self.head_dim``.

    The merge back is ``reshape(B, N, C)`` with ``C`` read off the input, exactly as timm writes
    it; this is the hard case for head pruning, on purpose.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(
        self, image_size: int, patch: int, dim: int, depth: int, num_heads: int,
        mlp_ratio: float = 4.0, num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


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
