"""count_flops counts every matrix product, including the fused CPU kernels FlopCounterMode misses.

The oracle is torch's own FlopCounterMode on an equivalent computation written with ops it does
count (mm / addmm / bmm): an unrolled LSTM with the module's own weights (its outputs checked
against nn.LSTM, so the oracle computes the same thing), attention written as two matmuls,
nn.Bilinear as an einsum. Where FlopCounterMode already counts (Linear, Conv, GRU on CPU) the
two must agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphprune


def _oracle(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = fn()
    return int(counter.get_total_flops()), out


def _unrolled_lstm(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """nn.LSTM (batch_first, uni- or bidirectional, no projection) as explicit matmuls per step."""
    inp = x
    steps = x.shape[1]
    for layer in range(lstm.num_layers):
        outs = []
        for reverse in range(2 if lstm.bidirectional else 1):
            sfx = f"_l{layer}" + ("_reverse" if reverse else "")
            w_ih, w_hh = getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)
            bias = getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx)
            h = x.new_zeros(x.shape[0], lstm.hidden_size)
            c = torch.zeros_like(h)
            hs = []
            for t in reversed(range(steps)) if reverse else range(steps):
                i, f, g, o = (inp[:, t] @ w_ih.T + h @ w_hh.T + bias).chunk(4, 1)
                c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                h = o.sigmoid() * c.tanh()
                hs.append(h)
            outs.append(torch.stack(hs[::-1] if reverse else hs, 1))
        inp = torch.cat(outs, -1)
    return inp


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_flops_equal_flop_counter_on_the_unrolled_lstm(bidirectional: bool) -> None:
    lstm = nn.LSTM(12, 16, num_layers=3, batch_first=True, bidirectional=bidirectional).eval()
    x = torch.randn(2, 5, 12)
    expected, out = _oracle(lambda: _unrolled_lstm(lstm, x))
    with torch.no_grad():
        torch.testing.assert_close(out, lstm(x)[0], rtol=1e-4, atol=1e-5)  # the oracle is an LSTM
    assert graphprune.count_flops(lstm, x) == expected > 0


def test_gru_and_plain_layers_agree_with_flop_counter_where_it_counts() -> None:
    model = nn.Sequential(nn.Conv1d(5, 7, 3), nn.Flatten(), nn.Linear(7 * 6, 9))
    x = torch.randn(2, 5, 8)
    assert graphprune.count_flops(model, x) == _oracle(lambda: model(x))[0] > 0
    gru = nn.GRU(6, 8, num_layers=2, batch_first=True).eval()
    xs = torch.randn(3, 4, 6)
    tokens, gates = 3 * 4, 3 * 8
    assert graphprune.count_flops(gru, xs) == 2 * tokens * gates * ((6 + 8) + (8 + 8))


def test_cpu_attention_kernels_are_counted_like_their_matmuls() -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 3)

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    expected, _ = _oracle(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert graphprune.count_flops(Sdpa(), (q, k, v)) == expected > 0

    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(3, 7, 16)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]  # eval + no_grad: the fused fast path

    # train mode (dropout 0) and need_weights=True take the unfused path, written with mm/bmm that
    # FlopCounterMode counts
    mha.train()
    expected, _ = _oracle(lambda: mha(x, x, x, need_weights=True))
    mha.eval()
    assert graphprune.count_flops(SelfAttention(), x) == expected > 0
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    ffn = 2 * 3 * 7 * (16 * 32 * 2)
    assert graphprune.count_flops(layer, x) == expected + ffn


def test_bilinear_is_counted_like_its_einsum() -> None:
    bl = nn.Bilinear(6, 5, 4)
    a, b = torch.randn(3, 6), torch.randn(3, 5)
    expected, _ = _oracle(lambda: torch.einsum("bi,oij,bj->bo", a, bl.weight, b))
    assert graphprune.count_flops(bl, (a, b)) == expected > 0


def test_target_flops_on_a_recurrent_model_counts_the_lstm() -> None:
    """target_flops must see the LSTM's arithmetic (it used to see only the Linear head)."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(2, 6, 8)
    full = graphprune.count_flops(model, x)
    assert full > 2 * 2 * 6 * 32 * 4 * 10  # the LSTM dominates the head's 2*B*T*32*4
    small = graphprune.compact(model, x, target_flops=0.5, verify=False)
    assert abs(graphprune.count_flops(small, x) / full - 0.5) <= 0.05


class _PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, tok = pair
        return self.fc(torch.cat([tok, x], 1))


class _ClassTokenHandedOn(nn.Module):
    """A class token expanded and handed to a submodule with the activations (PiT, CaiT do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 1, 8))
        self.blocks = _PairBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks((x, self.tok.expand(x.shape[0], -1, -1)))


def test_a_parameter_view_handed_to_a_submodule_is_counted() -> None:
    # under no_grad the expanded parameter requires grad without a grad_fn, which FlopCounterMode's
    # module tracker cannot hook (AssertionError before the fix)
    model, x = _ClassTokenHandedOn(), torch.randn(2, 3, 8)
    before = [p.requires_grad for p in model.parameters()]
    assert graphprune.count_flops(model, x) == 2 * 2 * 4 * 8 * 8
    assert [p.requires_grad for p in model.parameters()] == before  # the user's flags untouched
