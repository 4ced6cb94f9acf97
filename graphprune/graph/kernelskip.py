"""The recording forward without its heaviest arithmetic: large CPU convolutions and matrix
products return zeros of the right shape instead of being computed.

Why: the eager recorder (``eagertrace.py``) runs the user's forward on the real tensors only so
that the user's Python code runs as it would; the graph it writes down depends on the shapes,
strides and dtypes of the values, never on the numbers in them (every op whose result depends on
the numbers is refused before it runs: ``item()``, ``bool(t)``, boolean masks, ``nonzero``).
On a CPU the convolutions and matrix products are nearly all of a forward's time (ResNet-50: 0.3
of a 0.5 s recording), and their numbers are thrown away. Here they are not computed: the output
is a tensor of zeros with the metadata torch's own meta kernel gives (the function make_fx's
fake tensors use), made below autograd so the graph of ``requires_grad`` and ``grad_fn`` stays
what it was.

What stays exact, and how that is checked:

* Only ops big enough to repay a meta kernel (a Python function, ~0.1-0.3 ms) are skipped:
  ``estimated_work`` estimates multiply-adds from the argument shapes, grouped convolutions
  counted dearer per multiply-add (their kernels run several times slower), and only CPU tensors
  qualify (a GPU kernel is faster than the meta kernel).
* A forward that reads numbers without an op (``tolist()``, ``numpy()``, ``data_ptr()``: no op
  the recorder can refuse) after a skip raises ``ValuesRead``; so does any error raised after a
  skip (a kernel that rejects zeros). The recorder then runs the forward again, computing every
  op (``eagertrace.record``).
* ``tools/trace_parity.py`` compares the recording with make_fx's graph, and the tests compare a
  skipping recording with a computing one node for node.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# multiply-adds from which skipping an op's kernel saves more than its meta kernel costs (on a
# 2-core CPU: a dense 10 M multiply-add convolution took 1.1 ms, its meta kernel and zeros 0.5 ms;
# a dense 2.7 M one 0.23 ms against 0.33 ms)
MIN_WORK = 6e6
# grouped (depthwise) convolutions run several times slower per multiply-add (2.7 M: 1.1 ms)
GROUPED_COST = 4.0

# kernels below autograd that are skipped when an op above was judged heavy: they allocate their
# output and write nothing else
_BACKEND = {
    aten.convolution.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
    aten.baddbmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
}

# Tensor methods that read a tensor's numbers without an op the recorder sees
_READS = {
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.data_ptr,
    torch.Tensor.__dlpack__, torch.Tensor.untyped_storage, torch.Tensor.storage,
    torch.Tensor.__reduce_ex__,
}


class ValuesRead(Exception):
    """The forward read numbers (or failed) after a kernel was skipped: record it computing."""


def reads_values(func: Any) -> bool:
    """True for a torch-function call that reads a tensor's numbers outside the dispatcher."""
    return func in _READS


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _conv_work(args: tuple, kwargs: dict, transposed: bool) -> float:
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or w.dim() < 3:
        return 0.0
    channel = x.dim() - (w.dim() - 1)  # 1 for a batched input, 0 for an unbatched one
    if channel < 0 or x.shape[channel] == 0:
        return 0.0
    if not (x.is_contiguous() and w.is_contiguous()):
        # channels-last convolutions: the CPU kernels choose their output's layout by rules the
        # meta kernel does not follow (a depthwise one); such a convolution is computed
        return 0.0
    positions = x.numel() / x.shape[channel]
    stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
    steps = math.prod(stride) if isinstance(stride, (list, tuple)) else stride
    work = positions * w.numel() / (1 if transposed or not isinstance(steps, int) or steps < 1 else steps)
    grouped = not transposed and w.shape[1] != x.shape[channel]
    return work * (GROUPED_COST if grouped else 1.0)


def _product_work(a: Any, b: Any) -> float:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() == 0 or b.dim() == 0:
        return 0.0
    if b.dim() == 1:
        return float(a.numel())
    # a's rows times b's columns times the shared dim; broadcast batch dims counted on either side
    return float(max(a.numel() * b.shape[-1], b.numel() * (a.shape[-2] if a.dim() > 1 else 1)))


def _linear_work(args: tuple, kwargs: dict) -> float:
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or w.dim() != 2 or w.shape[1] == 0:
        return 0.0
    return x.numel() / w.shape[1] * w.numel()


def _attention_work(args: tuple, kwargs: dict) -> float:
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 2 or k.dim() < 2:
        return 0.0
    return 2.0 * q.numel() * k.shape[-2]


def _einsum_work(args: tuple, kwargs: dict) -> float:
    equation = args[0] if args else kwargs.get("equation")
    operands = args[1] if len(args) > 1 else kwargs.get("tensors")
    if not isinstance(equation, str) or "..." in equation or not isinstance(operands, (list, tuple)):
        return 0.0
    sizes: dict[str, int] = {}
    for letters, t in zip(equation.split("->")[0].split(","), operands, strict=False):
        letters = letters.strip()
        if not isinstance(t, torch.Tensor) or len(letters) != t.dim():
            return 0.0
        sizes.update(zip(letters, t.shape, strict=True))
    return float(math.prod(sizes.values()))


_WORK: dict[Any, Callable[[tuple, dict], float]] = {
    aten.conv1d.default: lambda a, k: _conv_work(a, k, False),
    aten.conv2d.default: lambda a, k: _conv_work(a, k, False),
    aten.conv3d.default: lambda a, k: _conv_work(a, k, False),
    aten.conv_transpose1d.default: lambda a, k: _conv_work(a, k, True),
    aten.conv_transpose2d.input: lambda a, k: _conv_work(a, k, True),
    aten.conv_transpose3d.input: lambda a, k: _conv_work(a, k, True),
    aten.linear.default: _linear_work,
    aten.matmul.default: lambda a, k: _product_work(*a[:2]) if len(a) > 1 else 0.0,
    aten.mm.default: lambda a, k: _product_work(*a[:2]) if len(a) > 1 else 0.0,
    aten.bmm.default: lambda a, k: _product_work(*a[:2]) if len(a) > 1 else 0.0,
    aten.addmm.default: lambda a, k: _product_work(*a[1:3]) if len(a) > 2 else 0.0,
    aten.baddbmm.default: lambda a, k: _product_work(*a[1:3]) if len(a) > 2 else 0.0,
    aten.einsum.default: _einsum_work,
    aten.scaled_dot_product_attention.default: _attention_work,
}


def estimated_work(func: Any, args: tuple, kwargs: dict) -> float:
    """Roughly how many multiply-adds ``func(*args, **kwargs)`` costs (0 for ops not estimated)."""
    estimate = _WORK.get(func)
    return 0.0 if estimate is None else estimate(args, kwargs)


def worth_skipping(func: Any, args: tuple, kwargs: dict) -> bool:
    """True if the op is heavy enough, and on the CPU, to be recorded without its kernel."""
    if func not in _WORK:
        return False
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None and len(args) > 1 and isinstance(args[1], (list, tuple)) and args[1]:
        first = args[1][0]  # einsum's operands
    if not isinstance(first, torch.Tensor) or first.device.type != "cpu":
        return False
    work = estimated_work(func, args, kwargs)  # 0: not estimated, never skipped
    return work > 0 and work >= MIN_WORK


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    return value


def _zeros_like(meta: Any, device: torch.device) -> Any:
    """Zeros with ``meta``'s shape, strides and dtype on ``device`` (``zeros_like`` of a meta
    tensor would run its meta kernel's Python registration again)."""
    if isinstance(meta, torch.Tensor):
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device).zero_()
    return meta


def _key(value: Any) -> Any:
    """What of an argument a meta kernel's output depends on, hashable."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_key(v) for v in value))
    hash(value)  # dtypes, devices, memory formats; an unhashable argument: TypeError, no caching
    return value


class Skipping(TorchDispatchMode):
    """Below autograd: the heavy kernels in ``_BACKEND`` return zeros shaped by their meta
    kernels; every other op (the views and reshapes around them) runs.

    A network repeats its layers, so the meta kernel's answer is kept per argument signature
    (shapes, strides, dtypes and the other arguments): a repeated layer costs only its zeros."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # no dynamo-disabling wrapper around every op
        return False

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0
        self.metas: dict[Any, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _BACKEND:
            return func(*args, **kwargs)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        try:
            key = (func, _key(args), _key(sorted(kwargs.items())))
        except TypeError:
            key = None
        out = self.metas.get(key) if key is not None else None
        if out is None:
            try:
                out = func(*_meta(args), **_meta(kwargs))
            except Exception:  # noqa: BLE001 - no meta kernel for these arguments: compute it
                return func(*args, **kwargs)
            if key is not None:
                self.metas[key] = out
        self.skipped += 1
        if isinstance(out, tuple):
            return tuple(_zeros_like(o, device) for o in out)
        return _zeros_like(out, device)
