"""The original traced program, run with every removed position held at zero (an fx Interpreter)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Interpreter, Node

from graphprune.graph.aliasing import storage_ptr
from graphprune.graph.rules.pointwise import reduced_dims
from graphprune.reference.gathered import PRODUCTS, Gatherer
from graphprune.reference.heap import release_free_memory
from graphprune.reference.masks import NORM_OPS, REDUCE_OPS, Inexact
from graphprune.reference.scratch import Scratch
from graphprune.reference.zeroing import Zeroing, keep_tensor

# masked weight copies (bytes) after which the heap is trimmed: at most this much freed memory
# waits in glibc's heap for the next trim
TRIM_BYTES = 16 << 20


class MaskedInterpreter(Interpreter):
    """Runs the traced program holding every removed position at zero (see module docstring)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        masks: dict[Node, Any],
        hard_masks: dict[Node, Any],
        protected: set[int],
        record: set[Node] | None = None,
    ):
        super().__init__(gm)
        self.masks = masks
        self.hard_masks = hard_masks  # inputs of statistics: False only where pruning is not allowed
        self.zeroings: dict[tuple[int, int, str], Zeroing] = {}  # keep-masks as torch, per rank
        self.copied = 0  # bytes of masked weight copies made since the heap was last trimmed
        self.protected = protected  # storages of the user's tensors: never written
        self.record = record or set()
        self.values: dict[Node, Any] = {}  # the recorded nodes' (masked) values
        # Placeholders (weights) are masked where they are used, not when they are read: masking a
        # user's weight makes a copy, and reading every placeholder first held a masked copy of the
        # whole model at once (3.7 GiB on a 4.1 GiB LLaMA). Only where every use is a direct
        # argument of an op; otherwise masked up front as before.
        self.lazy = {
            n for n in gm.graph.nodes
            if n.op == "placeholder" and n in masks and n.users
            and all(u.op == "call_function" and (n in u.args or n in u.kwargs.values()) for u in n.users)
        }
        self.scratch = Scratch(_slot_sizes(gm.graph, self.lazy))  # the masked copies' reused buffers
        self.reads_lazy = {u for n in self.lazy for u in n.users}  # ops with a weight to mask
        self.user_owned: dict[Node, bool] = {}  # lazy placeholder -> its value is the user's tensor
        self.gatherer = Gatherer()  # products on their kept channels (gathered.py)
        self.kinds: dict[Node, str] = {}  # ops run other than plainly: "statistic", "product", "rebind"
        self.written: dict[Node, list[Node]] = {}  # in-place ops: the arguments they write
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if n.target in NORM_OPS or n.target in REDUCE_OPS:
                self.kinds[n] = "statistic"
            elif n.target in PRODUCTS:
                self.kinds[n] = "product"
            elif rebinds(n):
                self.kinds[n] = "rebind"
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                self.written[n] = [a for a, spec in zip(n.args, schema.arguments)
                                   if isinstance(a, Node) and spec.alias_info is not None
                                   and spec.alias_info.is_write]

    # -- masks ---------------------------------------------------------------------------
    def _entry(self, node: Node, k: int | None) -> np.ndarray | None:
        """The numpy keep-mask of ``node`` (its ``k``-th output), or None."""
        entry = self.masks.get(node)
        if entry is None:
            return None
        if k is not None:
            return entry[k] if isinstance(entry, list) and k < len(entry) else None
        return None if isinstance(entry, list) else entry

    def _mask(self, node: Node, k: int | None, like: torch.Tensor) -> Zeroing | None:
        """``node``'s keep-mask (its ``k``-th output) for values like ``like``, made once per run."""
        entry = self._entry(node, k)
        if entry is None:
            return None
        key = (id(entry), like.dim(), str(like.device))  # masks live for the run: ids stay valid
        if key not in self.zeroings:
            self.zeroings[key] = Zeroing(entry, like.dim(), like.device)
        return self.zeroings[key]

    def _keep(self, node: Node, k: int | None, like: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask(node, k, like)
        return None if mask is None else mask.keep

    def _zeroing(self, node: Node, k: int | None, like: torch.Tensor) -> Zeroing | None:
        """How to zero ``node``'s removed positions in a value like ``like`` (None: none removed)."""
        mask = self._mask(node, k, like)
        return mask if mask is not None and mask.removes else None

    def _apply(self, t: Any, zero: Zeroing | None) -> Any:
        if zero is None or not isinstance(t, torch.Tensor):
            return t  # nothing removed here: a masked copy would only cost memory
        expanded = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
        if not expanded and storage_ptr(t) not in self.protected:
            try:
                return zero.into(t)  # in place: views of t see the zeros, as in the model
            except RuntimeError:  # expanded/overlapping memory
                pass
        return zero.copy(t)

    def _mask_value(self, node: Node, value: Any) -> Any:
        if node not in self.masks:
            return value
        if isinstance(value, (tuple, list)):
            out = [
                self._apply(v, self._zeroing(node, i, v)) if isinstance(v, torch.Tensor) else v
                for i, v in enumerate(value)
            ]
            return type(value)(out) if isinstance(value, tuple) else out
        if isinstance(value, torch.Tensor):
            return self._apply(value, self._zeroing(node, None, value))
        return value

    # -- execution -----------------------------------------------------------------------
    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().run(*args, **kwargs)
        finally:
            self.scratch.release()

    def fetch_args_kwargs_from_env(self, n: Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if n in self.reads_lazy:
            slots = iter(range(len(n.args) + len(n.kwargs)))  # one scratch buffer per argument
            args = tuple(self._lazy_mask(a, v, next(slots)) if isinstance(a, Node) and a in self.lazy
                         else v for a, v in zip(n.args, args, strict=True))
            kwargs = {k: self._lazy_mask(n.kwargs[k], v, next(slots)) if isinstance(n.kwargs[k], Node)
                      and n.kwargs[k] in self.lazy else v for k, v in kwargs.items()}
        return args, kwargs

    def _lazy_mask(self, node: Node, value: Any, slot: int) -> Any:
        """A weight masked just before the op that reads it: the user's own tensor goes into a
        reused scratch buffer (scratch.py); anything else is masked as ``_mask_value`` does."""
        owned = self.user_owned.get(node)
        if owned is None:  # a placeholder's value is the same tensor at every use
            owned = isinstance(value, torch.Tensor) and storage_ptr(value) in self.protected
            self.user_owned[node] = owned
        if owned:
            zero = self._zeroing(node, None, value)
            if zero is None:
                return value
            masked = self.scratch.masked(value, zero, slot)
            if masked is not None:
                self.copied += masked.nbytes  # trim the heap after the op (run_node)
                return masked
        masked = self._mask_value(node, value)  # a masked copy of its own: freed after the op
        self.copied += masked.nbytes if isinstance(masked, torch.Tensor) else 0
        return masked

    def run_node(self, n: Node) -> Any:
        if n.op != "call_function":
            result = super().run_node(n)
            if n.op == "placeholder" and n not in self.lazy:
                result = self._mask_value(n, result)
        else:
            kind = self.kinds.get(n)
            if kind == "statistic":
                result = self._run_statistic(n)
            elif kind == "product":
                result = self._run_product(n)
            elif kind == "rebind":  # the forward set ``self.buf = new`` of another shape: as it did
                result = self.env[n.args[1]]
            else:  # what torch's run_node does for an op, without its per-node meta context
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                result = n.target(*args, **kwargs)
            if n in self.reads_lazy:  # only an op reading a masked weight can return a view of it
                self.scratch.given_away(result)  # an output that views a scratch buffer keeps it
            # the op read masked weight copies (freed now, or in a scratch buffer): hand the heap's
            # free pages back (heap.py). Scratch buffers free nothing themselves, but without the
            # trim what the ops between two weights freed stayed in glibc's heap (+0.05 GiB peak on
            # TinyLlama). Once per TRIM_BYTES copied: a trim costs ~0.3 ms, a small network's
            # weights hundreds
            if self.copied >= TRIM_BYTES:
                self.copied = 0
                release_free_memory()
            result = self._mask_value(n, result)
            for arg in self.written.get(n, ()):  # an in-place op: what it wrote is re-zeroed
                value = self.env.get(arg)
                if isinstance(value, torch.Tensor):
                    self._apply(value, self._zeroing(arg, None, value))
        if n in self.record:
            self.values[n] = result
        return result

    def _run_product(self, n: Node) -> Any:
        """A convolution or linear layer on its kept channels only (gathered.py), else at full
        width with its weights masked."""
        args, kwargs = Interpreter.fetch_args_kwargs_from_env(self, n)  # weights not yet masked
        entries = [self._entry(a, None) if isinstance(a, Node) else None for a in n.args[:3]]
        result = self.gatherer.product(n.target, args, kwargs, entries, self._entry(n, None))
        if result is None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return n.target(*args, **kwargs)
        weight = args[1]  # its gathered copy is freed now: trim the heap in time (run_node)
        self.copied += weight.nbytes if isinstance(weight, torch.Tensor) else 0
        return result

    def _hard_keep(self, node: Node, like: torch.Tensor) -> torch.Tensor | None:
        entry = self.hard_masks.get(node)
        if entry is None or isinstance(entry, list):
            return None
        return keep_tensor(entry, like.dim(), like.device).expand(like.shape)

    def _run_statistic(self, n: Node) -> Any:
        """Run a reduction/normalisation on the kept positions only (exact under removal)."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0] if args else None
        src = n.args[0] if n.args else None
        keep = self._keep(src, None, x) if isinstance(src, Node) and isinstance(x, torch.Tensor) else None
        if keep is None:
            return n.target(*args, **kwargs)
        r = x.dim()
        dims = _reduced_dims(n, args, kwargs, r)
        plan = _gather_plan(keep.expand(x.shape), dims)
        if plan is None or _mixes(self._hard_keep(src, x), dims):
            return n.target(*args, **kwargs)  # nothing to gather, or a pruning no rule allowed
        args = list(args)
        args[0] = _gather(x, plan)
        kind = NORM_OPS.get(n.target)
        if kind is not None:
            nd = len(args[1])
            off = r - nd
            args[1] = list(args[0].shape[off:])
            for wi in (2, 3) if kind == "layer_norm" else (2,):
                if wi < len(args) and isinstance(args[wi], torch.Tensor):
                    args[wi] = _gather(args[wi], [(d - off, idx) for d, idx in plan])
        out = n.target(*args, **kwargs)
        if kind is not None:
            if isinstance(out, (tuple, list)):
                return type(out)([_scatter(out[0], plan, x.shape)] + list(out[1:]))
            return _scatter(out, plan, x.shape)
        return out


def rebinds(n: Node) -> bool:
    """True for the write-back torch.export records when a forward replaces a buffer by a tensor
    of another shape (a cache made on the first call: ``self.cache = torch.arange(n)...``).

    The program copies the new value into the old buffer, which cannot hold it; the forward
    rebound the attribute instead. Running the write-back as a rebinding gives what the forward
    computed (the value itself is already what later ops read)."""
    if n.op != "call_function" or n.target is not torch.ops.aten.copy_.default or len(n.args) < 2:
        return False
    dst, src = n.args[0], n.args[1]
    if not (isinstance(dst, Node) and isinstance(src, Node) and dst.op == "placeholder"):
        return False
    a, b = dst.meta.get("val"), src.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    try:  # a source that broadcasts into the buffer is a real copy (``buf.copy_(x)``)
        return tuple(torch.broadcast_shapes(a.shape, b.shape)) != tuple(a.shape)
    except RuntimeError:
        return True


def _slot_sizes(graph: torch.fx.Graph, lazy: set[Node]) -> dict[tuple[int, torch.dtype], int]:
    """The most elements each scratch slot holds per dtype: slot k is an op's k-th lazily masked
    argument, in the order ``fetch_args_kwargs_from_env`` numbers them."""
    sizes: dict[tuple[int, torch.dtype], int] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        k = 0
        for a in [*n.args, *n.kwargs.values()]:
            if isinstance(a, Node) and a in lazy:
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor) and isinstance(val.numel(), int):
                    sizes[(k, val.dtype)] = max(sizes.get((k, val.dtype), 0), val.numel())
                k += 1
    return sizes


def _reduced_dims(n: Node, args: list[Any], kwargs: dict[str, Any], r: int) -> list[int]:
    if n.target in NORM_OPS:
        return list(range(r - len(args[1]), r))
    return reduced_dims(n.target, args, kwargs, r)


def _mixes(keep: torch.Tensor | None, dims: list[int]) -> bool:
    """True if some row along ``dims`` has both kept and removed positions."""
    if keep is None or not dims or keep.numel() == 0:
        return False
    return not torch.equal(keep.amax(dim=dims), keep.amin(dim=dims))


def _gather_plan(keep: torch.Tensor, dims: list[int]) -> list[tuple[int, torch.Tensor]] | None:
    """Indices to gather along ``dims`` so a reduction sees only kept positions; None if no need.

    No gathering is needed when every row (position over the other dims) is wholly kept or
    wholly removed: a removed row's result is zeroed afterwards anyway.
    """
    if not dims:
        return None
    any_k = keep.amax(dim=dims, keepdim=True) if keep.numel() else keep
    all_k = keep.amin(dim=dims, keepdim=True) if keep.numel() else keep
    if torch.equal(any_k, all_k):
        return None
    others = [d for d in range(keep.dim()) if d not in dims]
    pattern = keep.amax(dim=others, keepdim=True) if others else keep
    if ((keep != pattern) & any_k).any():
        raise Inexact("a statistic over pruned channels whose kept positions differ between rows")
    plan = []
    outer = torch.ones_like(pattern)
    for d in dims:
        rest = [e for e in range(keep.dim()) if e != d]
        k_d = pattern.amax(dim=rest, keepdim=True)
        outer = outer & k_d
        plan.append((d, torch.nonzero(k_d.reshape(-1)).reshape(-1)))
    if not torch.equal(outer, pattern):
        raise Inexact("a statistic over pruned channels whose kept positions are not a rectangle")
    return [(d, idx) for d, idx in plan if len(idx) < keep.shape[d]]


def _gather(t: torch.Tensor, plan: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for d, idx in plan:
        if 0 <= d < t.dim() and t.shape[d] > 1:
            t = t.index_select(d, idx.to(t.device))
    return t


def _scatter(t: torch.Tensor, plan: list[tuple[int, torch.Tensor]], shape: torch.Size) -> torch.Tensor:
    for d, idx in reversed(plan):
        full = list(t.shape)
        full[d] = shape[d]
        out = t.new_zeros(full)
        out.index_copy_(d, idx.to(t.device), t)
        t = out
    return t
