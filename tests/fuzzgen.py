"""Random architectures for fuzzing graphprune, and the oracles every one of them must pass.

An architecture is a *spec*: plain JSON-able data (a list of op dicts plus an input and a head),
so a failing case can be printed, shrunk and pasted into a regression test. ``build(spec)``
turns it into an ordinary ``nn.Module`` (class ``FuzzNet``) whose layers are small modules
written the way people write them (reshapes from ``self.num_heads``, ``x.chunk``, ``torch.cat``).

The generator is written against a two-method ``Draw`` interface, so the same code is driven
by Hypothesis (``specs()``: shrinking, CI) or by a seeded ``random.Random`` (``random_spec``:
long runs in ``tools/fuzz.py``). Every drawn op is valid for the running state (channels,
spatial size), so no case is wasted on a model that does not run.

Building blocks: conv (grouped, depthwise), transposed conv, BatchNorm/GroupNorm/InstanceNorm,
channels-last LayerNorm, activations, residual add, elementwise-mul gating (squeeze-excitation,
GLU), cat (dense growth, multi-branch), split/chunk (uneven split), channel shuffle (reshape into
groups), pooling; for sequences Linear, LayerNorm/RMSNorm, attention (packed qkv + manual
softmax, SDPA, nn.MultiheadAttention, grouped-query), SwiGLU, cat of branches, reshape into
groups, class token and position embedding.

``run_case(spec, ratio)`` applies the oracles of ``tests/oracles.py`` and returns the failures
(empty list = pass): compact with verification, input untouched, output shape, another batch
size, ratio-0 identity, dead-channel invariance, onnxruntime equality.
"""

from __future__ import annotations

import json
import random
import re
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (4, 6, 8, 12, 16)
ACTS = ("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "relu6")
IMAGE_OPS = (
    "conv",
    "conv",
    "bn",
    "act",
    "act",
    "gn",
    "inorm",
    "ln_c",
    "res",
    "se",
    "cat",
    "cat_branches",
    "chunk_glu",
    "split_branch",
    "shuffle",
    "mul_branch",
    "add_branch",
    "pool",
    "convT",
)
SEQ_OPS = (
    "linear",
    "act",
    "ln",
    "rms",
    "attn",
    "attn",
    "mlp_res",
    "glu",
    "cat_lin",
    "split_lin",
    "group_scale",
    "mean_gate",
)
ATTN_KINDS = ("manual", "sdpa", "mha", "gqa")


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------


class Draw(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...
    def choice(self, options: Sequence[Any]) -> Any: ...


class RandomDraw:
    """``Draw`` from a seeded ``random.Random`` (long runs)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return self.rng.choice(list(options))


class HypothesisDraw:
    """``Draw`` from Hypothesis' ``draw`` (small integers and early options shrink best)."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        from hypothesis import strategies as st

        return self.draw(st.sampled_from(list(options)))


def _divisors(n: int, candidates: Sequence[int]) -> list[int]:
    return [g for g in candidates if g <= n and n % g == 0]


def _image_op(d: Draw, c: int, h: int, depth: int) -> tuple[dict[str, Any], int, int]:
    """One op valid for ``c`` channels at spatial size ``h``; returns (op, new c, new h)."""
    while True:
        kind = d.choice(IMAGE_OPS)
        if kind == "conv":
            out = d.choice(WIDTHS)
            groups = d.choice([1, 1, *_divisors(c, (2, 4)), *([c] if out % c == 0 else [])])
            groups = groups if out % groups == 0 and c % groups == 0 else 1
            return (
                {
                    "op": "conv",
                    "out": out,
                    "k": d.choice((1, 3)),
                    "groups": groups,
                    "bias": d.choice((True, False)),
                },
                out,
                h,
            )
        if kind == "convT" and h <= 4:
            out = d.choice(WIDTHS)
            return {"op": "convT", "out": out}, out, h * 2
        if kind == "bn":
            return {"op": "bn"}, c, h
        if kind == "act":
            return {"op": "act", "fn": d.choice(ACTS)}, c, h
        if kind == "gn" and _divisors(c, (2, 4)):
            return {"op": "gn", "groups": d.choice(_divisors(c, (1, 2, 4)))}, c, h
        if kind == "inorm":
            return {"op": "inorm"}, c, h
        if kind == "ln_c":
            return {"op": "ln_c"}, c, h
        if kind == "res" and depth < 2:
            body, bc, bh = [], c, h
            for _ in range(d.integer(1, 3)):
                op, nc, nh = _image_op(d, bc, bh, depth + 1)
                if nh != bh:  # the residual add needs the input's spatial size
                    continue
                body.append(op)
                bc = nc
            return {"op": "res", "body": body, "body_out": bc}, c, h
        if kind == "se":
            return {"op": "se", "hidden": d.choice((2, 4))}, c, h
        if kind == "cat":
            out = d.choice(WIDTHS)
            return {"op": "cat", "out": out}, c + out, h
        if kind == "cat_branches":
            parts = [d.choice(WIDTHS) for _ in range(d.integer(2, 3))]
            return {"op": "cat_branches", "parts": parts}, sum(parts), h
        if kind == "chunk_glu" and c % 2 == 0:
            return {"op": "chunk_glu"}, c // 2, h
        if kind == "split_branch" and c >= 3:
            first = d.integer(1, c - 1)
            out = d.choice(WIDTHS)
            return {"op": "split_branch", "first": first, "out": out}, out + c - first, h
        if kind == "shuffle" and _divisors(c, (2, 3, 4)):
            return {"op": "shuffle", "groups": d.choice(_divisors(c, (2, 3, 4)))}, c, h
        if kind == "mul_branch":
            out = d.choice(WIDTHS)
            return {"op": "mul_branch", "out": out}, out, h
        if kind == "add_branch":
            out = d.choice(WIDTHS)
            return {"op": "add_branch", "out": out}, out, h
        if kind == "pool" and h >= 2 and h % 2 == 0:
            return {"op": "pool", "kind": d.choice(("max", "avg"))}, c, h // 2


def _seq_op(d: Draw, c: int) -> tuple[dict[str, Any], int]:
    while True:
        kind = d.choice(SEQ_OPS)
        if kind == "linear":
            out = d.choice(WIDTHS)
            return {"op": "linear", "out": out, "bias": d.choice((True, False))}, out
        if kind == "act":
            return {"op": "act", "fn": d.choice(ACTS)}, c
        if kind in ("ln", "rms"):
            return {"op": kind}, c
        if kind == "attn":
            heads = _divisors(c, (1, 2, 4))
            kind_a = d.choice(ATTN_KINDS)
            if kind_a == "gqa":
                heads = [h for h in heads if h % 2 == 0]
                if not heads:
                    continue
            op = {"op": "attn", "kind": kind_a, "heads": d.choice(heads), "pre_norm": d.choice((True, False))}
            return op, c
        if kind == "mlp_res":
            return {"op": "mlp_res", "hidden": d.choice(WIDTHS), "fn": d.choice(ACTS)}, c
        if kind == "glu":
            return {"op": "glu", "hidden": d.choice(WIDTHS)}, c
        if kind == "cat_lin":
            parts = [d.choice(WIDTHS) for _ in range(d.integer(2, 3))]
            return {"op": "cat_lin", "parts": parts}, sum(parts)
        if kind == "split_lin" and c >= 3:
            first = d.integer(1, c - 1)
            out = d.choice(WIDTHS)
            return {"op": "split_lin", "first": first, "out": out}, out + c - first
        if kind == "group_scale" and _divisors(c, (2, 4)):
            return {"op": "group_scale", "groups": d.choice(_divisors(c, (2, 4)))}, c
        if kind == "mean_gate":
            return {"op": "mean_gate"}, c


def draw_spec(d: Draw, max_ops: int = 6) -> dict[str, Any]:
    """A random architecture spec (see module docstring)."""
    seed = d.integer(0, 2**16)
    if d.choice(("image", "seq")) == "image":
        c, h = d.choice((1, 3, 4)), d.choice((4, 6, 8))
        spec: dict[str, Any] = {"kind": "image", "in_ch": c, "size": h, "seed": seed, "ops": []}
        for _ in range(d.integer(1, max_ops)):
            op, c, h = _image_op(d, c, h, 0)
            spec["ops"].append(op)
        spec["head"] = d.choice(("gap_linear", "flatten_linear", "conv_out", "gap_mlp"))
    else:
        c = d.choice((4, 8, 12))
        spec = {
            "kind": "seq",
            "in_ch": c,
            "tokens": d.choice((3, 5)),
            "seed": seed,
            "ops": [],
            "embed": d.choice(("features", "tokens")),
            "cls_token": d.choice((False, True)),
            "pos_embed": d.choice((False, True)),
        }
        for _ in range(d.integer(1, max_ops)):
            op, c = _seq_op(d, c)
            spec["ops"].append(op)
        spec["head"] = d.choice(("mean_linear", "cls_linear", "per_token"))
    spec["classes"] = d.choice((3, 5))
    return spec


def random_spec(seed: int, max_ops: int = 6) -> dict[str, Any]:
    return draw_spec(RandomDraw(seed), max_ops)


def specs(max_ops: int = 6):
    """Hypothesis strategy of architecture specs."""
    from hypothesis import strategies as st

    @st.composite
    def _specs(draw: Any) -> dict[str, Any]:
        return draw_spec(HypothesisDraw(draw), max_ops)

    return _specs()


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------


def _act(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "hardswish": nn.Hardswish,
        "leaky_relu": nn.LeakyReLU,
        "relu6": nn.ReLU6,
    }[name]()


class ChannelsLastLayerNorm(nn.Module):
    """ConvNeXt-style LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, proj: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.proj is not None:
            y = self.proj(y)
        return x + y


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class CatGrow(nn.Module):
    """DenseNet-style: append new channels computed from the input."""

    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.relu(self.conv(x))], dim=1)


class CatBranches(nn.Module):
    def __init__(self, c: int, parts: list[int], conv: bool = True) -> None:
        super().__init__()
        make = (lambda o: nn.Conv2d(c, o, 1)) if conv else (lambda o: nn.Linear(c, o))
        self.branches = nn.ModuleList(make(o) for o in parts)
        self.dim = 1 if conv else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=self.dim)


class ChunkGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class SplitBranch(nn.Module):
    """Uneven split: transform the first part, pass the rest through, concatenate."""

    def __init__(self, c: int, first: int, out: int, conv: bool = True) -> None:
        super().__init__()
        self.first = first
        self.dim = 1 if conv else -1
        self.f = nn.Conv2d(first, out, 3, padding=1) if conv else nn.Linear(first, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.first, x.shape[self.dim] - self.first], dim=self.dim)
        return torch.cat([self.f(a), b], dim=self.dim)


class Shuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2)
        return x.reshape(b, c, h, w)


class TwoBranch(nn.Module):
    def __init__(self, c: int, out: int, mul: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, out, 3, padding=1)
        self.b = nn.Conv2d(c, out, 1)
        self.mul = mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * torch.sigmoid(self.b(x)) if self.mul else self.a(x) + self.b(x)


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class Attention(nn.Module):
    """Self-attention in four styles; residual, optionally pre-normed."""

    def __init__(self, c: int, heads: int, kind: str, pre_norm: bool) -> None:
        super().__init__()
        self.kind = kind
        self.num_heads = heads
        self.head_dim = c // heads
        self.scale = self.head_dim**-0.5  # set once, as timm and HF do (attention="head_dim" needs it)
        self.norm = nn.LayerNorm(c) if pre_norm else nn.Identity()
        if kind == "manual":
            self.qkv = nn.Linear(c, 3 * c)
            self.proj = nn.Linear(c, c)
        elif kind == "mha":
            self.mha = nn.MultiheadAttention(c, heads, batch_first=True)
        else:
            self.num_kv_heads = heads // 2 if kind == "gqa" else heads
            self.q = nn.Linear(c, c)
            self.k = nn.Linear(c, self.num_kv_heads * self.head_dim)
            self.v = nn.Linear(c, self.num_kv_heads * self.head_dim)
            self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, n, _ = h.shape
        if self.kind == "manual":
            qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            y = self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        elif self.kind == "mha":
            y = self.mha(h, h, h, need_weights=False)[0]
        else:
            q = self.q(h).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k(h).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v(h).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.kind == "gqa":
                rep = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            # the default scale (1/sqrt(head_dim)) equals self.scale: "sdpa" leaves it to SDPA,
            # "gqa" passes it, so attention="head_dim" meets both (rescaled q rows, fixed scale)
            scale = self.scale if self.kind == "gqa" else None
            y = F.scaled_dot_product_attention(q, k, v, scale=scale)
            y = self.proj(y.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return x + y


class MLPRes(nn.Module):
    def __init__(self, c: int, hidden: int, fn: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.act = _act(fn)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(c, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.up(x).chunk(2, dim=-1)
        return x + self.down(a * F.silu(g))


class GroupScale(nn.Module):
    """Reshape features into groups, scale each group by a learned factor, reshape back."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.scale = nn.Parameter(torch.rand(groups, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return (x.view(b, n, self.groups, c // self.groups) * self.scale).reshape(b, n, c)


class MeanGate(nn.Module):
    """Gate every token by a sigmoid of the token mean (a reduction over tokens, not channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean(dim=1, keepdim=True))


class FuzzNet(nn.Module):
    """The model a spec describes: a stem, a list of layers, a head."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.kind = spec["kind"]
        layers: list[nn.Module] = []
        c = spec["in_ch"]
        if self.kind == "image":
            h = spec["size"]
            for op in spec["ops"]:
                mod, c, h = _image_module(op, c, h)
                layers.append(mod)
            self.layers = nn.Sequential(*layers)
            self.head_kind = spec["head"]
            if self.head_kind == "gap_linear":
                self.head = nn.Linear(c, spec["classes"])
            elif self.head_kind == "gap_mlp":
                self.head = nn.Sequential(nn.Linear(c, 8), nn.ReLU(), nn.Linear(8, spec["classes"]))
            elif self.head_kind == "flatten_linear":
                self.head = nn.Linear(c * h * h, spec["classes"])
            else:
                self.head = nn.Conv2d(c, spec["classes"], 1)
        else:
            n = spec["tokens"]
            self.embed_kind = spec["embed"]
            self.embed = nn.Embedding(20, c) if self.embed_kind == "tokens" else nn.Linear(c, c)
            self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.5) if spec["cls_token"] else None
            n += 1 if spec["cls_token"] else 0
            self.pos_embed = nn.Parameter(torch.randn(1, n, c) * 0.5) if spec["pos_embed"] else None
            for op in spec["ops"]:
                mod, c = _seq_module(op, c)
                layers.append(mod)
            self.layers = nn.Sequential(*layers)
            self.head_kind = spec["head"]
            self.head = nn.Linear(c, spec["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "image":
            x = self.layers(x)
            if self.head_kind in ("gap_linear", "gap_mlp"):
                return self.head(x.mean((2, 3)))
            if self.head_kind == "flatten_linear":
                return self.head(x.flatten(1))
            return self.head(x)
        x = self.embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.layers(x)
        if self.head_kind == "mean_linear":
            return self.head(x.mean(dim=1))
        if self.head_kind == "cls_linear":
            return self.head(x[:, 0])
        return self.head(x)


def _image_module(op: dict[str, Any], c: int, h: int) -> tuple[nn.Module, int, int]:
    kind = op["op"]
    if kind == "conv":
        k = op["k"]
        return nn.Conv2d(c, op["out"], k, padding=k // 2, groups=op["groups"], bias=op["bias"]), op["out"], h
    if kind == "convT":
        return nn.ConvTranspose2d(c, op["out"], 2, stride=2), op["out"], h * 2
    if kind == "bn":
        return nn.BatchNorm2d(c), c, h
    if kind == "act":
        return _act(op["fn"]), c, h
    if kind == "gn":
        return nn.GroupNorm(op["groups"], c), c, h
    if kind == "inorm":
        return nn.InstanceNorm2d(c, affine=True), c, h
    if kind == "ln_c":
        return ChannelsLastLayerNorm(c), c, h
    if kind == "res":
        mods, bc = [], c
        for sub in op["body"]:
            mod, bc, _ = _image_module(sub, bc, h)
            mods.append(mod)
        proj = nn.Conv2d(bc, c, 1) if bc != c or not mods else None
        return Residual(nn.Sequential(*mods), proj), c, h
    if kind == "se":
        return SqueezeExcite(c, op["hidden"]), c, h
    if kind == "cat":
        return CatGrow(c, op["out"]), c + op["out"], h
    if kind == "cat_branches":
        return CatBranches(c, op["parts"]), sum(op["parts"]), h
    if kind == "chunk_glu":
        return ChunkGLU(), c // 2, h
    if kind == "split_branch":
        return SplitBranch(c, op["first"], op["out"]), op["out"] + c - op["first"], h
    if kind == "shuffle":
        return Shuffle(op["groups"]), c, h
    if kind in ("mul_branch", "add_branch"):
        return TwoBranch(c, op["out"], kind == "mul_branch"), op["out"], h
    if kind == "pool":
        return Pool(op["kind"]), c, h // 2
    raise ValueError(f"unknown image op {kind}")


def _seq_module(op: dict[str, Any], c: int) -> tuple[nn.Module, int]:
    kind = op["op"]
    if kind == "linear":
        return nn.Linear(c, op["out"], bias=op["bias"]), op["out"]
    if kind == "act":
        return _act(op["fn"]), c
    if kind == "ln":
        return nn.LayerNorm(c), c
    if kind == "rms":
        return nn.RMSNorm(c), c
    if kind == "attn":
        return Attention(c, op["heads"], op["kind"], op["pre_norm"]), c
    if kind == "mlp_res":
        return MLPRes(c, op["hidden"], op["fn"]), c
    if kind == "glu":
        return SwiGLU(c, op["hidden"]), c
    if kind == "cat_lin":
        return CatBranches(c, op["parts"], conv=False), sum(op["parts"])
    if kind == "split_lin":
        return SplitBranch(c, op["first"], op["out"], conv=False), op["out"] + c - op["first"]
    if kind == "group_scale":
        return GroupScale(c, op["groups"]), c
    if kind == "mean_gate":
        return MeanGate(), c
    raise ValueError(f"unknown sequence op {kind}")


def build(spec: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, example input)`` with weights fixed by ``spec['seed']``."""
    from graphprune.zoo import _finish

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = FuzzNet(spec)
        if spec["kind"] == "image":
            x = torch.randn(2, spec["in_ch"], spec["size"], spec["size"])
            calib = torch.randn(4, spec["in_ch"], spec["size"], spec["size"])
        elif spec["embed"] == "tokens":
            x = torch.randint(0, 20, (2, spec["tokens"]))
            calib = torch.randint(0, 20, (4, spec["tokens"]))
        else:
            x = torch.randn(2, spec["tokens"], spec["in_ch"])
            calib = torch.randn(4, spec["tokens"], spec["in_ch"])
        model, x = _finish(model, x, calib)
    return model, x


# ------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------


@dataclass
class Failure:
    oracle: str
    error: str  # exception type and first line
    detail: str = ""

    @property
    def signature(self) -> str:
        """Stable across cases: numbers and names stripped, for grouping failures."""
        text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", self.error)
        text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
        return f"{self.oracle}: {text[:160]}"


@dataclass
class CaseResult:
    spec: dict[str, Any]
    ratio: float
    prune_hidden: bool
    failures: list[Failure] = field(default_factory=list)
    attention: str = "heads"
    pruned: bool = False  # something was actually removed (the case tested pruning)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_case(
    spec: dict[str, Any],
    ratio: float,
    prune_hidden: bool = False,
    onnx: bool = True,
    attention: str = "heads",
) -> CaseResult:
    """Apply every oracle to ``spec`` compacted at ``ratio``; collect failures instead of raising."""
    import oracles

    import graphprune
    from graphprune.graph.inputs import flatten_outputs, run_model

    result = CaseResult(spec, ratio, prune_hidden, attention=attention)
    structure = {"prune_hidden": prune_hidden, "attention": attention}
    model, x = build(spec)

    def check(name: str, fn) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the case
            result.failures.append(Failure(name, _first_line(exc), traceback.format_exc(limit=-6)))
            return None

    before = oracles.snapshot(model)
    out = check(
        "compact", lambda: graphprune.compact_with_plan(model, x, ratio=ratio, **structure)
    )
    check("input untouched", lambda: oracles.assert_untouched(model, before))
    if out is not None:
        small, plan = out
        result.pruned = any(g.removed for g in plan.groups)

        def shapes_and_batch() -> None:
            expected = [tuple(t.shape) for t in flatten_outputs(run_model(model, x))]
            got = [tuple(t.shape) for t in flatten_outputs(run_model(small, x))]
            assert got == expected, f"output shapes {got} != {expected}"
            x3 = torch.cat([x, x[:1]])
            got3 = [tuple(t.shape) for t in flatten_outputs(run_model(small, x3))]
            exp3 = [tuple(t.shape) for t in flatten_outputs(run_model(model, x3))]
            assert got3 == exp3, f"batch 3: output shapes {got3} != {exp3}"

        check("shapes", shapes_and_batch)
        if onnx:
            check("onnx", lambda: oracles.check_onnx(small, x, rtol=1e-3))
    check("ratio 0", lambda: oracles.check_ratio_zero_identity(model, x))
    analysis = check("analyze", lambda: graphprune.analyze(model, x, attention=attention))
    if analysis is not None and any(g.prunable for g in analysis.groups):
        # ratio >= 0.5 so every prunable group loses a unit whatever rounding the planner uses
        # (round(0.25 * 2) == 0 would leave nothing removed and the oracle would test nothing)
        check(
            "dead channels",
            lambda: oracles.check_dead_channels(model, x, max(ratio, 0.5), rtol=1e-4, attention=attention),
        )
    return result


def spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, separators=(",", ":"))


# ------------------------------------------------------------------------------------------
# Shrinking a failing spec
# ------------------------------------------------------------------------------------------


def _simpler(spec: dict[str, Any]):
    """Candidate specs one step simpler than ``spec`` (some may not build; callers skip those)."""
    ops = spec["ops"]
    for i in range(len(ops)):
        if len(ops) > 1:
            yield {**spec, "ops": ops[:i] + ops[i + 1 :]}
        op = ops[i]
        if op["op"] == "res":
            for j in range(len(op["body"])):
                body = op["body"][:j] + op["body"][j + 1 :]
                yield {**spec, "ops": ops[:i] + [{**op, "body": body}] + ops[i + 1 :]}
            yield {**spec, "ops": ops[:i] + op["body"] + ops[i + 1 :]}
        for key in ("out", "hidden"):
            if key in op and op[key] > 4:
                yield {**spec, "ops": ops[:i] + [{**op, key: 4}] + ops[i + 1 :]}
        if "parts" in op and len(op["parts"]) > 2:
            yield {**spec, "ops": ops[:i] + [{**op, "parts": op["parts"][:2]}] + ops[i + 1 :]}
    simplest_head = "gap_linear" if spec["kind"] == "image" else "mean_linear"
    if spec["head"] != simplest_head:
        yield {**spec, "head": simplest_head}
    for key in ("cls_token", "pos_embed"):
        if spec.get(key):
            yield {**spec, key: False}
    if spec.get("embed") == "tokens":
        yield {**spec, "embed": "features"}


def _valid(spec: dict[str, Any]) -> bool:
    try:
        model, x = build(spec)
        with torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001 - an invalid simplification, skip it
        return False


def shrink(
    spec: dict[str, Any],
    ratio: float,
    prune_hidden: bool,
    signature: str,
    budget: int = 80,
    attention: str = "heads",
) -> dict[str, Any]:
    """Greedily simplify ``spec`` while the failure with ``signature`` still happens."""
    onnx = signature.startswith("onnx")
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for cand in _simpler(spec):
            if tries >= budget:
                break
            if not _valid(cand):
                continue
            tries += 1
            res = run_case(cand, ratio, prune_hidden, onnx=onnx, attention=attention)
            if any(f.signature == signature for f in res.failures):
                spec = cand
                improved = True
                break
    return spec
