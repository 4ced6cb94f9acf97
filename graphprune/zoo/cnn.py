"""The zoo's convolutional families and the MLP, written the way users write them.

VGG, ResNet (basic and bottleneck blocks, ResNeXt groups), DenseNet, MobileNetV2/V3 (with
squeeze-excitation), ShuffleNetV2 (chunk + channel shuffle), U-Net (``torch.cat`` skips), MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
