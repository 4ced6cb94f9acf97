"""Masked copies of the user's weights, written into reused buffers.

The masked reference (interpreter.py) must not write into the user's weights, so each pruned
weight is copied with its removed positions zeroed just before the op that reads it, and the
copy is dropped after the op. A fresh copy per op was the dearest part of the reference: on a
4.1 GiB TinyLlama the 154 masked copies cost more than the matrix products that read them
(glibc hands a 46 MiB allocation straight to ``mmap``, so every fresh copy is paid for again in
page faults). ``Scratch`` keeps one buffer per argument slot of an op and
writes each masked copy into it instead:

* the masked copy is written into the buffer (``Zeroing.copy``: a copy, then the removed rows
  and columns set to zero), no allocation, exact zeros (a ``0 * inf`` would not be), the same
  values and strides as a fresh copy;
* a buffer is reused only if nothing still refers to it: when an op's output is a view of its
  masked argument (a transpose, a reshape), that buffer is handed over to the output and a new
  one is allocated for the next weight.

Memory: the buffers hold one masked copy per argument slot, allocated once at the size of the
largest weight that slot will hold (``sizes``, read from the graph: no buffer is outgrown and
left behind in the heap): what the per-op copies held at the largest weight. They are freed
when the run ends (``release``).
"""

from __future__ import annotations

from typing import Any

import torch

from graphprune.graph.aliasing import storage_ptr
from graphprune.reference.heap import release_free_memory
from graphprune.reference.zeroing import Zeroing


class Scratch:
    """Reusable buffers for masked weight copies (module docstring)."""

    def __init__(self, sizes: dict[tuple[int, torch.dtype], int] | None = None) -> None:
        self.sizes = sizes or {}  # (slot, dtype) -> the most elements it will hold (allocated at that size)
        self.buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # -> flat buffer
        self.ptrs: dict[tuple[int, torch.dtype, torch.device], int | None] = {}  # -> its storage
        self.views: dict[tuple[int, torch.dtype, torch.device], dict[torch.Size, torch.Tensor]] = {}
        self.freed = False  # a buffer was replaced by a larger one (its pages: ``release``)

    def masked(self, t: torch.Tensor, zero: Zeroing, slot: int) -> torch.Tensor | None:
        """``t`` with the positions ``zero`` removes set to zero, in buffer ``slot``.

        None when ``t`` does not fit a buffer (not contiguous, or no storage): the caller then
        makes a copy of its own."""
        if not t.is_contiguous() or t.layout != torch.strided or t.is_meta or storage_ptr(t) is None:
            return None
        key = (slot, t.dtype, t.device)
        flat = self.buffers.get(key)
        if flat is None or flat.numel() < t.numel():
            if flat is not None:
                self.freed = True
            size = max(t.numel(), self.sizes.get((slot, t.dtype), 0))
            flat = torch.empty(size, dtype=t.dtype, device=t.device)
            self.buffers[key] = flat
            self.ptrs[key] = storage_ptr(flat)
            self.views[key] = {}  # views of this buffer, by shape
        views = self.views[key]
        view = views.get(t.shape)
        if view is None:  # weights of one shape recur (every block): the view is made once
            view = views[t.shape] = flat[: t.numel()].view(t.shape)
        return zero.copy(t, out=view)

    def given_away(self, result: Any) -> None:
        """Stop reusing every buffer that ``result`` (an op's output) is a view of."""
        if not self.buffers:
            return
        ptrs = set()
        for v in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(v, torch.Tensor):
                p = storage_ptr(v)
                if p is not None:
                    ptrs.add(p)
        for key in [k for k, p in self.ptrs.items() if p in ptrs]:
            del self.buffers[key], self.ptrs[key], self.views[key]  # the output owns it now

    def release(self) -> None:
        """Drop the buffers and hand their pages back to the OS (heap.py)."""
        had = bool(self.buffers) or self.freed
        self.buffers.clear()
        self.ptrs.clear()
        self.views.clear()
        self.freed = False
        if had:
            release_free_memory()
