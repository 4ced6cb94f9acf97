"""Hand-written transformer building blocks, the way people write them outside Hugging Face.

Each model is tiny (width 32, 1-2 blocks, sequence length 8) and exercises one way of writing
attention, grouped-query attention, gated MLPs, norms, tied embeddings or recurrent layers, so the
engine's rules are checked against code it was not written for. ``build(name)`` returns
``(model in eval mode, example input)`` with fixed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEQ = 8
DIM = 32
VOCAB = 48


class HandAttention(nn.Module):
    """timm-style: one packed qkv Linear, a reshape into heads using ``self.num_heads``/``head_dim``.

    ``merge`` is how heads are merged back: ``"C"`` is timm's ``reshape(B, N, C)`` with ``C`` read
    off the input (the class cannot run once heads are removed: C is the hidden size), ``"attrs"``
    uses ``self.num_heads * self.head_dim`` and ``"-1"`` lets reshape infer it.
    """

    def __init__(self, dim: int = DIM, num_heads: int = 4, merge: str = "attrs") -> None:
        super().__init__()
        self.merge = merge
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        width = {"C": C, "attrs": self.num_heads * self.head_dim, "-1": -1}[self.merge]
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, width))


class SdpaAttention(nn.Module):
    """Separate q/k/v projections, ``view`` with ``-1`` heads, ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int = DIM, num_heads: int = 4, causal: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class GQAAttention(nn.Module):
    """Grouped-query attention: ``num_heads`` q heads share ``num_kv_heads`` k/v heads.

    ``how`` picks the way k/v are repeated to the q heads: ``repeat_interleave``, ``expand``
    (+ reshape, the Hugging Face ``repeat_kv``) or SDPA's own ``enable_gqa``.
    """

    def __init__(self, how: str, dim: int = DIM, num_heads: int = 4, num_kv_heads: int = 2) -> None:
        super().__init__()
        self.how = how
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        n_rep = self.num_heads // self.num_kv_heads
        if self.how == "repeat_interleave":
            return t.repeat_interleave(n_rep, dim=1)
        b, h, s, d = t.shape
        return t[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.how == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = self._repeat(k), self._repeat(v)
            scores = (q @ k.transpose(-2, -1)) / self.head_dim**0.5
            mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class RMSNorm(nn.Module):
    """Hand-written RMSNorm (LLaMA's): ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: gate and up share their output units."""

    def __init__(self, dim: int = DIM, hidden: int = 64) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block around any attention and MLP."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(DIM)
        self.attn = attn
        self.norm2 = norm(DIM)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM))


class Encoder(nn.Module):
    """Linear embedding of a feature sequence, blocks, a pooled classifier head."""

    def __init__(self, blocks: list[nn.Module], norm: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.embed = nn.Linear(12, DIM)
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm(DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class MHAEncoder(nn.Module):
    """``nn.MultiheadAttention`` (packed in_proj) in a pre-norm block, either batch layout."""

    def __init__(self, batch_first: bool, num_heads: int = 4) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(12, DIM)
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, num_heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = _gelu_mlp()
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=not self.batch_first)[0]  # both code paths
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1 if self.batch_first else 0))


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` across two sequences with ``kdim``/``vdim`` != ``embed_dim``.

    Its heads are pruned with the width of the query projection feeding it (nothing normalises
    that width), and the key and value widths separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_in = nn.Linear(12, DIM)
        self.k_in = nn.Linear(10, 16)
        self.v_in = nn.Linear(10, 20)
        self.attn = nn.MultiheadAttention(DIM, 4, kdim=16, vdim=20, batch_first=True)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = (torch.relu(f(t)) for f, t in ((self.q_in, x), (self.k_in, memory), (self.v_in, memory)))
        return self.head(self.attn(q, k, v, need_weights=False)[0])


class TinyLM(nn.Module):
    """Decoder LM: token embedding, LLaMA-style blocks, RMSNorm, LM head tied to the embedding."""

    def __init__(self, tied: bool = True, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(
            Block(GQAAttention("expand"), SwiGLU(), RMSNorm) for _ in range(depth)
        )
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


class RNNClassifier(nn.Module):
    """Embedding -> (bi)LSTM or GRU (batch_first) -> Linear on the last step."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(16, 24, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(24 * (2 if bidirectional else 1), 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def _features() -> torch.Tensor:
    return torch.randn(2, SEQ, 12)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ))


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norm weights and biases, so slicing them wrongly shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _encoder(attn: Callable[[], nn.Module], depth: int = 1, gated: bool = False) -> nn.Module:
    """Blocks around ``attn()``: GELU MLP + LayerNorm, or SwiGLU + hand-written RMSNorm."""
    norm = RMSNorm if gated else nn.LayerNorm
    mlp = SwiGLU if gated else _gelu_mlp
    return Encoder([Block(attn(), mlp(), norm) for _ in range(depth)], norm)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "hand_attention": lambda: (_encoder(HandAttention), _features()),
    "hand_attention_merge_minus1": lambda: (_encoder(lambda: HandAttention(merge="-1")), _features()),
    "timm_attention_merge_C": lambda: (_encoder(lambda: HandAttention(merge="C")), _features()),
    "sdpa": lambda: (_encoder(SdpaAttention, depth=2), _features()),
    "mha_batch_first": lambda: (MHAEncoder(batch_first=True), _features()),
    "mha_seq_first": lambda: (MHAEncoder(batch_first=False), _features()),
    "mha_cross_kdim_vdim": lambda: (CrossAttention(), (_features(), torch.randn(2, 6, 10))),
    "gqa_repeat_interleave": lambda: (
        _encoder(lambda: GQAAttention("repeat_interleave"), gated=True), _features()),
    "gqa_expand": lambda: (_encoder(lambda: GQAAttention("expand"), gated=True), _features()),
    "gqa_enable_gqa": lambda: (_encoder(lambda: GQAAttention("enable_gqa"), gated=True), _features()),
    "tiny_lm_tied": lambda: (TinyLM(tied=True), _ids()),
    "lstm": lambda: (RNNClassifier("lstm"), _ids()),
    "gru": lambda: (RNNClassifier("gru"), _ids()),
    "lstm_2layer_bidirectional": lambda: (RNNClassifier("lstm", layers=2, bidirectional=True), _ids()),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """Build ``name`` with fixed weights and input; the caller's RNG state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, x = BUILDERS[name]()
        return _randomize(model), x
