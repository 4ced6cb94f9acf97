"""Convolutions and linear layers of the masked reference computed on their kept channels only.

Why: the masked reference (interpreter.py) runs the original program at its original width,
with the removed positions held at zero, so its convolutions and matrix products cost a whole
original forward (ResNet-50: most of a 0.5 s reference), though every removed input channel
contributes nothing and every removed output channel is zeroed afterwards.

Why this is the same reference. For an op ``y = op(x, W, b)`` that contracts ``x``'s channel dim
with ``W``'s input dim (``conv1d/2d/3d`` with ``groups == 1``, ``linear``), holding removed
positions at zero gives, at a kept output channel ``o``:

    y[o] = b'[o] + sum over c of W'[o, c] * x'[c]

where ``'`` marks the masked values. A channel ``c`` that ``x``'s mask or ``W``'s input mask
removes contributes exactly zero, so the sum runs over the channels both keep. So the op is run
on ``x`` gathered to those channels and ``W`` gathered to the kept output rows and those
columns, with ``W``'s and ``b``'s own masks applied to what was gathered (a row the weight's
mask removes is zero, as in the masked weight); the result is scattered back to the full width,
zero elsewhere (which the masking after the op would have written anyway). The sums differ from
the full-width ones only in order, as the compact model's do.

Only masks that are a product of one vector per dimension, removing along the contracted and
output channel dims only (and the weight's first two dims), are taken, and only products large
enough to repay the gathering (``MIN_WORK``; channels-last convolutions are never counted, see
``graph/kernelskip.py``); anything else runs at full width as before (``None``). The positions
come from the reference's own masks (built from ``plan.slices``), never from surgery.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graphprune.graph.kernelskip import estimated_work
from graphprune.reference.zeroing import removed_lines

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
PRODUCTS = CONVS | {aten.linear.default}
# multiply-adds from which gathering repays its own small ops (index selects, the scatter: ~0.1 ms
# on a 2-core CPU, where a 3.6 M multiply-add convolution took 0.3 ms and a 26 M one 1.9 ms)
MIN_WORK = 6e6


class Gatherer:
    """Gathers products on their kept channels; keeps what it derives from a mask for the run.

    Masks are shared between the values they describe (a layer's output and the next layer's
    input) and live as long as the run, so keep vectors and index tensors are worked out once
    per mask (keyed by ``id``, like the interpreter's zeroings).
    """

    def __init__(self, min_work: float = MIN_WORK) -> None:
        self.min_work = min_work
        self.vectors: dict[tuple[int, int, int, int], np.ndarray | None] = {}
        self.weights: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, np.ndarray] | None] = {}
        self.pairs: dict[tuple[int, int], np.ndarray] = {}
        self.ones: dict[int, np.ndarray] = {}  # "all kept", one array per size
        self.indices: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}
        self._held: list[Any] = []  # the masks keyed by id: alive while their ids are keys

    def _all(self, size: int) -> np.ndarray:
        if size not in self.ones:
            self.ones[size] = np.ones(size, dtype=bool)
        return self.ones[size]

    def _kept(self, entry: np.ndarray | None, ndim: int, size: int, dim: int) -> np.ndarray | None:
        """The keep vector along ``dim`` of a rank-``ndim`` value whose keep-mask is ``entry``
        (all kept if None); None if the mask also removes along another dim or is no product."""
        if entry is None:
            return self._all(size)
        key = (id(entry), ndim, size, dim)
        if key not in self.vectors:
            self._held.append(entry)
            lines = removed_lines(entry, ndim)
            keep = None
            if lines is not None and all(d == dim for d, _ in lines):
                keep = np.ones(size, dtype=bool)
                for _, idx in lines:
                    keep[idx] = False
            self.vectors[key] = keep
        return self.vectors[key]

    def _weight(self, entry: np.ndarray | None, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The weight's kept rows and columns (dims 0 and 1); None if it removes along other dims."""
        if entry is None:
            return self._all(w.shape[0]), self._all(w.shape[1])
        key = (id(entry), tuple(w.shape))
        if key not in self.weights:
            self._held.append(entry)
            lines = removed_lines(entry, w.dim())
            found = None
            if lines is not None and all(d <= 1 for d, _ in lines):
                rows, cols = np.ones(w.shape[0], dtype=bool), np.ones(w.shape[1], dtype=bool)
                for d, idx in lines:
                    (rows if d == 0 else cols)[idx] = False
                found = rows, cols
            self.weights[key] = found
        return self.weights[key]

    def _both(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a & b``, the same array for the same two (so its index tensor is made once)."""
        key = (id(a), id(b))
        if key not in self.pairs:
            self._held += [a, b]
            self.pairs[key] = a if b.all() else a & b
        return self.pairs[key]

    def _index(self, keep: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        key = (id(keep), str(device))
        if key not in self.indices:
            self._held.append(keep)
            idx = np.flatnonzero(keep)
            self.indices[key] = (idx, torch.as_tensor(idx, device=device))
        return self.indices[key]

    def product(self, func: Any, args: tuple, kwargs: dict, entries: list[np.ndarray | None],
                out_entry: np.ndarray | None) -> torch.Tensor | None:
        """``func(*args, **kwargs)`` as the masked reference computes it, on kept channels only.

        ``args`` are the unmasked values (input, weight, bias, the rest); ``entries`` the
        keep-masks of the first three (None: nothing removed), ``out_entry`` the output's. None
        where this does not apply or saves too little: the caller then runs the op at full width.
        """
        if kwargs or len(args) < 2:
            return None
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dtype != w.dtype:
            return None
        if b is not None and not isinstance(b, torch.Tensor):
            return None
        if func in CONVS:
            groups = args[6] if len(args) > 6 else 1
            if groups != 1 or x.dim() not in (w.dim(), w.dim() - 1):
                return None
            cdim = x.dim() - (w.dim() - 1)  # the channel dim of the input and of the output
        elif func is aten.linear.default:
            if w.dim() != 2 or x.dim() < 1:
                return None
            cdim = x.dim() - 1
        else:
            return None
        if x.shape[cdim] != w.shape[1] or estimated_work(func, args, kwargs) < self.min_work:
            return None
        keep_x = self._kept(entries[0], x.dim(), x.shape[cdim], cdim)
        weight = self._weight(entries[1], w)
        keep_b = self._kept(entries[2] if b is not None and len(entries) > 2 else None, 1, w.shape[0], 0)
        keep_out = self._kept(out_entry, x.dim(), w.shape[0], cdim)
        if keep_x is None or weight is None or keep_b is None or keep_out is None:
            return None
        rows, cols = weight
        keep_in = self._both(keep_x, cols)
        if keep_in.all() and keep_out.all():
            return None  # nothing to gain
        device = x.device
        idx_in, t_in = self._index(keep_in, device)
        idx_out, t_out = self._index(keep_out, device)
        if not idx_in.size or not idx_out.size:
            return None
        xg = x if idx_in.size == x.shape[cdim] else x.index_select(cdim, t_in)
        wg = w if idx_out.size == w.shape[0] else w.index_select(0, t_out)  # (faster than w[rows, cols])
        wg = wg if idx_in.size == w.shape[1] else wg.index_select(1, t_in)
        zero_rows = np.flatnonzero(~rows[idx_out])  # kept outputs whose weight row the mask removes
        if zero_rows.size:
            wg = wg.clone() if wg is w else wg  # never the user's weight
            wg.index_fill_(0, torch.as_tensor(zero_rows, device=device), 0)
        bg = None
        if b is not None:
            bg = b.index_select(0, t_out)
            gone = np.flatnonzero(~keep_b[idx_out])
            if gone.size:
                bg.index_fill_(0, torch.as_tensor(gone, device=device), 0)
        yg = func(xg, wg, bg, *args[3:])
        shape = list(yg.shape)
        shape[cdim] = w.shape[0]
        y = yg.new_zeros(shape)  # contiguous, as the full-width op gives on contiguous inputs
        return y.index_copy_(cdim, t_out, yg)


def gathered_product(func: Any, args: tuple, kwargs: dict, entries: list[np.ndarray | None],
                     out_entry: np.ndarray | None, min_work: float = MIN_WORK) -> torch.Tensor | None:
    """One product on its kept channels (``Gatherer.product``, nothing kept between calls)."""
    return Gatherer(min_work).product(func, args, kwargs, entries, out_entry)
