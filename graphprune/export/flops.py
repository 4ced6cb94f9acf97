"""FLOPs of one forward pass: torch's FlopCounterMode plus the ops it does not count.

``torch.utils.flop_counter.FlopCounterMode`` counts 2 x multiply-accumulates of mm / addmm /
bmm / baddbmm / convolution and of the CUDA attention kernels. On CPU several ops that do the
same kind of arithmetic reach the dispatcher as one fused kernel it has no formula for, and
count as 0: an ``nn.LSTM`` (``mkldnn_rnn_layer``: a 3-layer LSTM of 432 MFLOPs counted as its
Linear head only), ``scaled_dot_product_attention`` (``_scaled_dot_product_flash_attention_for_cpu``),
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in eval mode (their fused fast
paths) and ``nn.Bilinear`` (``_trilinear``). Each gets a formula here in the same convention
(2 x MACs of the matrix products, nothing for elementwise ops, norms, activations or bias adds),
so a recurrent or attention model's FLOPs, ``benchmark``'s ideal speed-up and ``target_flops``
mean the same as a CNN's. The formulas are checked against FlopCounterMode on an equivalent
model built from ops it does count (tests/test_flops.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.graph.copies import eval_copy, keeps_global_rng
from graphprune.graph.inputs import run_model

aten = torch.ops.aten


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _tokens(input_shape: Any) -> int:
    """Positions a recurrent layer steps over: every dim but the feature dim (seq x batch, or packed rows)."""
    return _numel(input_shape[:-1])


def _rnn_layer_flops(input, w_ih, w_hh, w_ih_b, w_hh_b, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    """One direction of one mkldnn LSTM layer: both gate matrices at every time step."""
    return 2 * _tokens(input) * (_numel(w_ih) + _numel(w_hh))


def _rnn_full_flops(input, hx, params, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    """aten.lstm / gru / rnn_* (when they reach the dispatcher whole): every weight matrix per step.

    ``params`` lists w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction; layers above the
    first step over the same positions, so each 2-D matrix costs 2 x tokens x its size.
    """
    return 2 * _tokens(input) * sum(_numel(p) for p in params if len(p) == 2)


def _attention_flops(q: Any, k: Any, v: Any) -> int:
    """q @ k^T and attn @ v: 2 x B x H x Lq x Lk x (E_qk + E_v) (kv heads broadcast, as in GQA)."""
    batch_heads = _numel(q[:-2])
    lq, e_qk = int(q[-2]), int(q[-1])
    lk, e_v = int(k[-2]), int(v[-1])
    return 2 * batch_heads * lq * lk * (e_qk + e_v)


def _sdpa_cpu_flops(query, key, value, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return _attention_flops(query, key, value)


def _mha_core_flops(query, key, value, embed_dim: int, proj_weight) -> int:
    """Fused nn.MultiheadAttention on (batch, seq, embed) inputs: q/k/v projections, attention
    (q @ k^T and attn @ v summed over heads: 2 x B x Lq x Lk x E each) and the output projection."""
    e = int(embed_dim)
    tq, tk, tv = _tokens(query), _tokens(key), _tokens(value)
    projections = 2 * e * e * (tq + tk + tv) + 2 * tq * e * int(proj_weight[0])
    return projections + _attention_flops(query, key, value)


def _native_mha_flops(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                      *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return _mha_core_flops(query, key, value, embed_dim, proj_weight)


def _encoder_layer_flops(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                         norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2,
                         *args: Any, out_shape: Any = None, **kw: Any) -> int:
    """Fused nn.TransformerEncoderLayer: self-attention plus the two feed-forward matrices."""
    attn = _mha_core_flops(src, src, src, embed_dim, proj_weight)
    return attn + 2 * _tokens(src) * (_numel(ffn_weight_1) + _numel(ffn_weight_2))


def _trilinear_flops(i1, i2, i3, expand1, expand2, expand3, sumdim, *args: Any,
                     out_shape: Any = None, **kw: Any) -> int:
    """nn.Bilinear's x1^T W x2, costed as einsum evaluates it: the first summed dim is contracted
    over the full product space, the remaining ones over what is left (2 x B x O x I x J + 2 x B x O x J)."""
    dims = max(len(i1) + len(expand1), len(i2) + len(expand2), len(i3) + len(expand3))
    sizes = [1] * dims
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        it = iter(shape)
        for d in range(len(shape) + len(expand)):
            if d not in expand:
                sizes[d] = max(sizes[d], int(next(it)))
    total = _numel(sizes)
    rest = total // max(sizes[sumdim[0]], 1) if len(sumdim) > 1 else 0
    return 2 * (total + rest)


def _extra_formulas() -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    for name, fn in (
        ("mkldnn_rnn_layer", _rnn_layer_flops),
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
        ("_native_multi_head_attention", _native_mha_flops),
        ("_transformer_encoder_layer_fwd", _encoder_layer_flops),
        ("_trilinear", _trilinear_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            table[op] = fn
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        op = getattr(aten, name, None)
        if op is not None:
            table[op.input] = _rnn_full_flops
    return table


@keeps_global_rng
def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward pass on ``example_input`` (2 x MACs of every matrix product).

    ``FlopCounterMode``'s count plus the fused CPU kernels it misses (recurrent layers, CPU
    attention, see the module docstring). An eval-mode copy of the model runs under
    ``torch.no_grad`` (a forward may write into its own weights).
    """
    work = eval_copy(model)
    # FlopCounterMode's module tracker hooks the gradients of every module's inputs; a parameter
    # passed straight into a submodule (a class token handed on with the activations) has no
    # gradient function under no_grad and makes it fail. The copy is private: no gradients needed.
    work.requires_grad_(False)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with counter:
        run_model(work, example_input)
    return int(counter.get_total_flops())
