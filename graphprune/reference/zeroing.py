"""Setting a value's removed positions to zero: by rows and columns where that is cheaper.

Why: the masked reference (interpreter.py) zeroes the removed positions of every weight and of
every op's output, so on a large network that part of a run cost about as much as the forward
itself (ResNet-50: 0.3 s of masking beside 0.33 s of ops). A keep-mask is nearly always a
product of one vector per dimension (channels, heads, rows of a weight): zeroing the removed
index lines of each dimension (``index_fill_``) writes only the removed part and reads nothing,
where ``masked_fill_``/``where`` with a broadcast mask read and write the whole tensor. On small
tensors the per-op cost dominates instead, and one element-wise op beats a copy plus one
``index_fill_`` per dimension, so the choice is made by size (``LINES_MIN``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# elements from which a value is zeroed by index lines rather than element-wise
LINES_MIN = 1 << 15


def removed_lines(keep: np.ndarray, ndim: int) -> list[tuple[int, np.ndarray]] | None:
    """The removed indices per dimension of a ``ndim``-dim value whose keep-mask (broadcastable,
    leading dims may be missing) is ``keep``: ``[(dim, indices), ...]``, ``[]`` if nothing is
    removed, None if the mask is not a product of one vector per dimension."""
    if keep.ndim > ndim:
        return None
    keep = keep.reshape((1,) * (ndim - keep.ndim) + keep.shape)
    dims = [d for d in range(ndim) if keep.shape[d] > 1]
    if len(dims) == 1:
        gone = np.flatnonzero(~keep.reshape(-1))
        return [(dims[0], gone)] if gone.size else []
    lines = []
    product = np.ones(keep.shape, dtype=bool)
    for d in dims:
        line = keep.any(axis=tuple(e for e in range(ndim) if e != d), keepdims=True)
        product = product & line
        gone = np.flatnonzero(~line.reshape(-1))
        if gone.size:
            lines.append((d, gone))
    return lines if np.array_equal(product, keep) else None


def keep_tensor(keep: np.ndarray, ndim: int, device: torch.device) -> torch.Tensor:
    """A numpy keep-mask as a torch bool tensor of rank ``ndim`` (leading dims of size 1 added)."""
    t = torch.as_tensor(keep, device=device)
    if t.dim() < ndim:
        t = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
    return t


@functools.lru_cache(maxsize=64)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero (``torch.where`` with ``out=`` takes no Python scalar); never written."""
    return torch.zeros((), dtype=dtype, device=device)


class Zeroing:
    """How to zero the removed positions of values of one rank on one device, given their
    numpy keep-mask: by index lines for large values where the mask is a product of
    per-dimension vectors, else element-wise. Both forms are made when first needed;
    ``removes`` is False when the mask keeps everything (then there is nothing to zero)."""

    def __init__(self, keep: np.ndarray, ndim: int, device: torch.device) -> None:
        self.entry = keep
        self.ndim = ndim
        self.device = device
        self.removes = not keep.all()
        self._lines: list[tuple[int, torch.Tensor]] | None | bool = False  # False: not yet known
        self._keep: torch.Tensor | None = None
        self._drop: torch.Tensor | None = None

    @property
    def keep(self) -> torch.Tensor:
        """The keep-mask as a torch bool tensor of rank ``ndim`` (broadcastable)."""
        if self._keep is None:
            self._keep = keep_tensor(self.entry, self.ndim, self.device)
        return self._keep

    def _by_lines(self, t: torch.Tensor) -> list[tuple[int, torch.Tensor]] | None:
        if t.numel() < LINES_MIN:
            return None
        if self._lines is False:
            found = removed_lines(self.entry, self.ndim)
            self._lines = None if found is None else [
                (d, torch.as_tensor(i, device=self.device)) for d, i in found]
        return self._lines  # type: ignore[return-value]

    def into(self, t: torch.Tensor) -> torch.Tensor:
        """Zero ``t``'s removed positions in place (RuntimeError where its memory overlaps)."""
        lines = self._by_lines(t)
        if lines is None:
            if self._drop is None:
                self._drop = ~self.keep
            return t.masked_fill_(self._drop, 0)
        for d, idx in lines:
            t.index_fill_(d, idx, 0)
        return t

    def copy(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of ``t`` with its removed positions zero (written into ``out`` if given)."""
        if self._by_lines(t) is not None:
            return self.into(t.clone() if out is None else out.copy_(t))
        zero = _zero(t.dtype, t.device)  # one pass, exact zeros (a 0 * inf would not be)
        return torch.where(self.keep, t, zero) if out is None else torch.where(self.keep, t, zero, out=out)
