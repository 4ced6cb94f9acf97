"""Consumers: the layers that read a group's units and can be refit by least squares.

A unit of a group appears in many tensors (the producer's output rows, a norm's entries, the
next layer's input columns). Reconstruction works on the **consumers**: layers whose output
is a linear map of their input columns, ``y = W x + b``. For each kind this module says which
columns a unit owns and how to read those columns off the layer's input:

* ``nn.Linear`` (an MLP's down projection, an attention output projection after head removal,
  a classifier after a flatten): one column per input feature;
* ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` (1x1 and kxk): one column per input channel
  and kernel position (the im2col matrix, channel-major like ``weight.reshape(out, -1)``);
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` input-to-hidden weights (``weight_ih_lK`` and their
  reverse): one column per input feature of layer ``K`` (the gate pre-activations are linear in
  them). Layer ``K > 0`` reads the output of the layers below it inside the module, which no
  hook sees, so it is recomputed from the module's input by a ``K``-layer copy of the module.

Depthwise and grouped convolutions are not consumers: a depthwise conv's input and output
channel are the same unit, so the reconstruction happens at the next mixing layer. The
recurrent weights (``weight_hh``) are not refit: their input is the state being pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.graph.analysis import Group


@dataclass
class Consumer:
    """One refittable layer reading (some of) a group's units on its input dimension."""

    module: str  # module path
    weight: str  # parameter name, e.g. "fc.weight" or "lstm.weight_ih_l0"
    bias: str | None  # parameter refit with the weight (None: the layer has no bias)
    unit_of: np.ndarray  # unit index per input channel, -1 where not this group's

    @property
    def key(self) -> str:
        return self.weight

    @property
    def layer(self) -> int:
        """The recurrent layer whose input this is (0 for everything else)."""
        m = _RNN_INPUT.fullmatch(self.weight.rpartition(".")[2])
        return int(m.group(1)) if m else 0


_RNN_INPUT = re.compile(r"weight_ih_l(\d+)(?:_reverse)?")


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def is_consumer(mod: nn.Module | None, attr: str, dim: int) -> bool:
    """Whether parameter ``attr`` of ``mod`` on ``dim`` is the input side of a refittable layer."""
    if isinstance(mod, nn.Linear):
        return attr == "weight" and dim == 1
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return attr == "weight" and dim == 1 and mod.groups == 1
    if isinstance(mod, nn.RNNBase):
        return bool(_RNN_INPUT.fullmatch(attr)) and dim == 1 and mod.proj_size == 0
    return False


def bias_name(mod: nn.Module, path: str, attr: str) -> str | None:
    pre = f"{path}." if path else ""
    if isinstance(mod, nn.RNNBase):
        name = attr.replace("weight_ih", "bias_ih")
        return pre + name if isinstance(getattr(mod, name, None), torch.Tensor) else None
    return pre + "bias" if isinstance(getattr(mod, "bias", None), torch.Tensor) else None


def consumers_of(group: Group, model: nn.Module) -> list[Consumer]:
    out = []
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        mod = _module(model, path)
        if is_consumer(mod, attr, m.dim) and (m.unit_of >= 0).any():
            out.append(Consumer(path, m.name, bias_name(mod, path, attr), m.unit_of))
    return out


def kernel_size(mod: nn.Module) -> int:
    """Columns per input channel: the kernel's positions for a conv, 1 otherwise."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return int(np.prod(mod.kernel_size))
    return 1


def rnn_layer_input(mod: nn.RNNBase, args: tuple[Any, ...], layer: int) -> Any:
    """The input of recurrent layer ``layer``: the module's input run through the layers below."""
    x = args[0]
    if layer == 0:
        return x
    kw = {"nonlinearity": mod.nonlinearity} if isinstance(mod, nn.RNN) else {}
    below = type(mod)(
        mod.input_size, mod.hidden_size, num_layers=layer, bias=mod.bias, batch_first=mod.batch_first,
        bidirectional=mod.bidirectional, **kw,
    )
    for name, p in below.named_parameters():
        p.data = getattr(mod, name).detach()
    hx = args[1] if len(args) > 1 else None
    dirs = 2 if mod.bidirectional else 1
    if isinstance(hx, tuple):
        hx = tuple(h[: layer * dirs] for h in hx)
    elif isinstance(hx, torch.Tensor):
        hx = hx[: layer * dirs]
    return below(x, hx)[0]


def columns(mod: nn.Module, x: Any) -> torch.Tensor | None:
    """The layer's input as rows of columns ``(samples, in_channels * kernel)``, or None.

    For a recurrent module ``x`` is the input of the layer concerned (``rnn_layer_input``).
    """
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x = x.data
    if not isinstance(x, torch.Tensor):
        return None
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, mod.in_features)
    if isinstance(mod, nn.RNNBase):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        spatial = 1 if isinstance(mod, nn.Conv1d) else 2
        if x.dim() == spatial + 1:
            x = x.unsqueeze(0)
        padding = mod.padding
        if isinstance(padding, str) or mod.padding_mode != "zeros":
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * spatial
        if spatial == 1:
            x = x.unsqueeze(2)
            k, d, p, s = (1, *mod.kernel_size), (1, *mod.dilation), (0, *padding), (1, *mod.stride)
        else:
            k, d, p, s = mod.kernel_size, mod.dilation, padding, mod.stride
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*K, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def weight_matrix(model: nn.Module, c: Consumer) -> torch.Tensor:
    """The consumer's weight as ``(out, columns)``."""
    w = _param(model, c.weight)
    return w.detach().reshape(w.shape[0], -1)


def _param(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(_module(model, path), attr)


def write(model: nn.Module, c: Consumer, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store a refit ``(out, columns)`` weight (and bias) into the consumer, in place."""
    w = _param(model, c.weight)
    with torch.no_grad():
        w.copy_(weight.reshape(w.shape).to(w.dtype))
        if bias is not None and c.bias is not None:
            b = _param(model, c.bias)
            b.copy_(bias.to(b.dtype))
