"""Micro-models whose own code cannot run at pruned sizes (tests/test_rewrite.py).

Both read a size where graphprune cannot update it, as timm's ViT attention and CSP stages do:
``InputWidthAttention`` merges its heads back to the width read off its *input*, and
``StoredSplitStage`` splits with a width stored in a plain attribute at construction.
"""

from __future__ import annotations

import torch
from torch import nn


class InputWidthAttention(nn.Module):
    """Multi-head self-attention ending in ``reshape(B, N, C)`` with ``C = x.shape[-1]``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), InputWidthAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Two blocks of InputWidthAttention: the outer class must survive head pruning."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


class StoredSplitStage(nn.Module):
    """Cross-stage partial: expand, split in two by a stored width, convolve one half, concat."""

    def __init__(self, cin: int = 8, expand: int = 16) -> None:
        super().__init__()
        self.expand_chs = expand
        self.conv_exp = nn.Sequential(nn.Conv2d(cin, expand, 1), nn.BatchNorm2d(expand), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(expand // 2, expand // 2, 3, padding=1), nn.ReLU())
        self.conv_transition = nn.Conv2d(expand, cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.conv_transition(torch.cat([xs, self.block(xb)], dim=1))


class TinyCsp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(StoredSplitStage(), StoredSplitStage())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class WindowAttention(nn.Module):
    """Attention over an ``(H, W)`` token grid given as a tuple, optionally shifted (Swin, PVT).

    Two things timm's PVT-v2 and torchvision's Swin do: the grid size comes in as a plain tuple
    argument (``forward(x, feat_size)``), and blocks of one class differ only in a *list*
    attribute (``shift_size=[0]`` vs ``[1]``) that makes the shifted ones run more ops (rolls).
    Like ConViT, it keeps the tokens' squared distances in a buffer that starts empty and is
    filled by the first forward (a per-head-scaled distance bias), so a module that has never
    run holds another state than one that has. It ends in ``reshape(B, N, C)`` with ``C`` read
    off the input, so it cannot run smaller.
    """

    def __init__(self, dim: int = 32, heads: int = 4, shift: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.shift_size = heads, dim // heads, [shift]
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.pos_scale = nn.Parameter(torch.linspace(0.05, 0.2, heads))
        self.register_buffer("distances", torch.zeros(1, 1), persistent=False)

    def train(self, mode: bool = True) -> None:  # type: ignore[override]
        """Returns None, as timm's EfficientViT attention's does: ``m.eval()(x)`` must not be used."""
        super().train(mode)

    @staticmethod
    def _distances(hw: tuple[int, int]) -> torch.Tensor:
        pos = torch.arange(hw[0] * hw[1])
        rows, cols = (pos // hw[1]).float(), (pos % hw[1]).float()
        return (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2

    def _roll(self, x: torch.Tensor, hw: tuple[int, int], sign: int) -> torch.Tensor:
        B, N, C = x.shape
        s = sign * self.shift_size[0]
        return torch.roll(x.reshape(B, hw[0], hw[1], C), shifts=(s, s), dims=(1, 2)).reshape(B, N, C)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        if self.shift_size[0]:
            x = self._roll(x, hw, 1)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.distances.shape[0] != N:  # a cache, filled once
            self.distances = self._distances(hw).to(x.device)
        bias = -self.pos_scale.view(1, -1, 1, 1) * self.distances
        if self.shift_size[0]:  # shifted windows: a token sees the columns within the shift of its own
            col = torch.arange(N, device=x.device) % hw[1]
            bias = bias.masked_fill((col[:, None] - col[None, :]).abs() > self.shift_size[0], float("-inf"))
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self._roll(x, hw, -1) if self.shift_size[0] else x


class WindowBlock(nn.Module):
    def __init__(self, dim: int, shift: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, shift=shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x))


class TinyWindowed(nn.Module):
    """A conv stem to a token grid, an unshifted and a shifted WindowAttention block, a head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.blocks = nn.ModuleList([WindowBlock(dim, 0), WindowBlock(dim, 1)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, hw)
        return self.head(x.mean(1))
