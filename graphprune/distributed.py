"""torch.distributed helpers: every rank measures, agrees and ends with the same result.

graphprune does not have a distributed layer of its own; it uses the process group the user
started (``torchrun`` + ``torch.distributed.init_process_group``). When one is initialised with
more than one rank, graphprune's data-driven work becomes collective:

* calibration statistics (Taylor, Hessian, activation, APoZ, reconstruction) are *sums* over
  the local batches, all-reduced with :func:`all_reduce_sum` before any score is made, so every
  rank plans exactly what one process would plan on the union of the ranks' data;
* the model and example input are checked to be the same on every rank (:func:`check_same`),
  and so is the resulting plan: a rank that disagrees is named in a :class:`DistributedError`
  instead of silently producing a model that differs from its neighbours';
* a failure on one rank (a rank without data) is shared (:func:`together`) so that every rank
  raises instead of the others waiting forever in the next collective.

Collectives need every rank to call them in the same order: plan on every rank, or plan on
one rank inside ``with graphprune.distributed.local():`` and hand the plan to the others with
:func:`broadcast_plan`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graphprune.errors import DistributedError

# Collectives are off inside ``local()`` (planning on one rank while the others wait).
_LOCAL = contextvars.ContextVar("graphprune_distributed_local", default=False)

# All-reduce at most this many float64 elements at once (512 MiB), so summing a 7B model's
# Taylor statistics does not need a second copy of them in float64.
BUCKET_ELEMENTS = 1 << 26


def is_initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_distributed() -> bool:
    """True when graphprune's work is collective: a process group of two or more ranks,
    outside :func:`local`."""
    return is_initialized() and not _LOCAL.get() and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the rank that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def require(what: str) -> None:
    """Refuse distributed work when no process group exists, saying how to start one."""
    if not is_initialized():
        raise DistributedError(
            f"{what} asks for distributed work but torch.distributed has no process group: launch "
            "with `torchrun --nproc_per_node=N script.py` and call "
            "torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPUs) first, "
            "or leave the option out to run in this process alone."
        )


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block graphprune makes no collective call (plan on one rank only).

    Use it to plan on rank 0 while the other ranks wait in :func:`broadcast_plan`; the plan
    then reflects rank 0's calibration data only.
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def agree(value: str, what: str, hint: str = "") -> None:
    """Every rank must hold the same ``value`` (a fingerprint); else all ranks raise, naming who differs."""
    if not is_distributed():
        return
    values = _gather(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(
            f"{what} differs between ranks: rank(s) {differ} disagree with rank 0 "
            f"({world_size()} ranks). {hint}".rstrip()
        )


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run local work whose failure on any rank must stop every rank.

    Without this a rank that fails (no calibration data) leaves the others blocked in the
    next collective until the process group times out. The block must not itself make
    collective calls. The failing rank re-raises its own error; the others raise a
    :class:`DistributedError` naming the failing rank and its message.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if not is_distributed():
            raise
        error = exc
    if not is_distributed():
        return
    statuses = _gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: s for r, s in enumerate(statuses) if s is not None}
    if error is not None:
        raise error
    if failed:
        first = min(failed)
        raise DistributedError(
            f"{what} failed on rank(s) {sorted(failed)} (rank {first}: {failed[first]}); "
            "every rank stops so that none waits forever for the others."
        )


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "statistics") -> list[torch.Tensor]:
    """The element-wise sum of ``tensors`` over all ranks (new tensors; inputs left as they are).

    Every rank must pass tensors of the same shapes in the same order (checked: a mismatch
    raises :class:`DistributedError` on every rank). Sums are taken in float64 and returned in
    each tensor's own dtype and device, so counts held as float or int tensors stay exact.
    Without a process group (or inside :func:`local`) the inputs are returned unchanged.
    """
    tensors = list(tensors)
    if not is_distributed():
        return tensors
    shapes = ";".join(f"{tuple(t.shape)}" for t in tensors)
    agree(
        digest(shapes),
        f"the shapes of the {what} to all-reduce",
        "Every rank must measure the same model with the same options.",
    )
    device = comm_device()
    out: list[torch.Tensor] = []
    start = 0
    while start < len(tensors):
        stop, size = start, 0
        while stop < len(tensors) and (stop == start or size + tensors[stop].numel() <= BUCKET_ELEMENTS):
            size += tensors[stop].numel()
            stop += 1
        chunk = tensors[start:stop]
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in chunk])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        for t, piece in zip(chunk, flat.split([t.numel() for t in chunk])):
            out.append(piece.reshape(t.shape).to(device=t.device, dtype=t.dtype))
        start = stop
    return out


def mean_over_ranks(value: float) -> float:
    """The mean of a number over all ranks (a loss to log the same everywhere)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return float(t.item()) / world_size()


def all_reduce_dict(stats: Mapping[Any, torch.Tensor], what: str = "statistics") -> dict[Any, torch.Tensor]:
    """:func:`all_reduce_sum` of a dict of tensors, matched by key (sorted), so ranks that built
    their dicts in different orders still add the right tensors together."""
    if not is_distributed():
        return dict(stats)
    keys = sorted(stats, key=repr)
    agree(
        digest(repr(keys)),
        f"the names of the {what} to all-reduce",
        "Every rank must measure the same model with the same options.",
    )
    return dict(zip(keys, all_reduce_sum([stats[k] for k in keys], what)))


# ------------------------------------------------------------------------------------------
# Fingerprints: cheap digests compared across ranks
# ------------------------------------------------------------------------------------------


def _tensor_digest(h: Any, t: torch.Tensor, values: bool) -> None:
    h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    if values and not t.is_meta and t.numel():
        flat = t.detach().contiguous().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        h.update(flat.view(torch.uint8).cpu().numpy().data)


def _walk(h: Any, obj: Any, path: str, values: bool) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(path.encode())
        _tensor_digest(h, obj, values)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=repr):
            _walk(h, obj[k], f"{path}.{k}", values)
    elif isinstance(obj, (tuple, list)):
        h.update(f"{path}:{type(obj).__name__}{len(obj)}".encode())
        for i, v in enumerate(obj):
            _walk(h, v, f"{path}[{i}]", values)
    elif isinstance(obj, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        h.update(f"{path}={obj!r}".encode())
    else:  # other objects: their type (a default repr holds a memory address, different per rank)
        h.update(f"{path}:{type(obj).__qualname__}".encode())


def digest(text: str) -> str:
    """A short, stable digest of ``text`` (to compare a plan's JSON across ranks)."""
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(obj: Any, values: bool = True) -> str:
    """A digest of a module (class, parameter and buffer names, shapes, dtypes and, with
    ``values``, their bytes) or of an input structure (tensors and plain leaves)."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        h.update(type(obj).__qualname__.encode())
        tensors = itertools.chain(
            obj.named_parameters(remove_duplicate=False), obj.named_buffers(remove_duplicate=False)
        )
        for name, t in tensors:
            h.update(name.encode())
            _tensor_digest(h, t, values)
    else:
        _walk(h, obj, "", values)
    return h.hexdigest()


def check_same(what: str, **objects: Any) -> None:
    """Refuse to go on unless every keyword's object has the same fingerprint on every rank.

    ``check_same("make_plan", model=model, example_input=x)``: a rank built with another seed,
    checkpoint or input shape would plan differently; the error names the object and the ranks.
    """
    if not is_distributed():
        return
    for name, obj in objects.items():
        agree(
            fingerprint(obj),
            f"{what}: the {name.replace('_', ' ')}",
            f"Give every rank the same {name.replace('_', ' ')} (same class, weights, shapes and "
            "values): seed the random generator identically before building it, or load one "
            "checkpoint on every rank.",
        )


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for plans and other small objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_plan(plan: Any, src: int = 0) -> Any:
    """Rank ``src``'s plan on every rank (the others pass ``None``): plan once, apply everywhere."""
    got = broadcast_object(plan, src)
    if got is None:
        raise DistributedError(
            f"broadcast_plan: rank {src} sent no plan; the source rank passes its Plan, the others None"
        )
    return got


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op without a process group).

    For state that ranks update on their own (BatchNorm running statistics during training)
    and that must end equal everywhere.
    """
    if not is_distributed():
        return
    device = comm_device()
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(device).contiguous()
            torch.distributed.broadcast(buf, src=src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        torch.distributed.barrier()
