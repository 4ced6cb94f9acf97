"""Data-parallel training of a student on torch.distributed: DDP, FSDP, or this process alone.

:func:`graphprune.recover` trains through a :class:`Parallel`: it forwards and optimises
``parallel.module`` and at the end calls :meth:`Parallel.finish`, after which the user's
``student`` holds the trained weights, the same on every rank.

* ``"ddp"`` wraps the student itself in ``DistributedDataParallel``: gradients are averaged
  over ranks, so every rank takes the same step and the student is trained in place, as
  without a process group. ``static_graph=True`` lets students with parameters that the loss
  does not reach (a pooler the distillation ignores) train without
  ``find_unused_parameters``' per-step graph walk.
* ``"fsdp"`` shards a copy of the student with ``torch.distributed.fsdp.fully_shard`` (each
  element of every ``nn.ModuleList``, the usual stack of blocks, is its own unit, then the
  root), so parameters, gradients and optimiser state are split over the ranks; ``finish``
  gathers the full weights and loads them into the student on every rank. A copy is trained
  because ``fully_shard`` changes the class and parameters of the module it is given.
* ``"local"``: the student alone, no collective.

Buffers (BatchNorm running statistics) are updated by each rank's own batches; ``finish``
gives every rank rank 0's, as DDP does at every forward.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphprune.distributed import broadcast_tensors, comm_device, is_distributed, require, world_size
from graphprune.errors import InputError

STRATEGIES = ("auto", "local", "ddp", "fsdp")


def resolve_strategy(strategy: str | None) -> str:
    """``"local"``, ``"ddp"`` or ``"fsdp"``: ``None``/``"auto"`` is DDP under a process group of
    two or more ranks, else local; asking for DDP/FSDP without a process group is refused."""
    strategy = "auto" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "ddp" if is_distributed() else "local"
    if strategy in ("ddp", "fsdp"):
        require(f"strategy={strategy!r}")
        if not is_distributed():
            return "local"  # one rank: data parallel over one process is this process
    return strategy


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


@dataclass
class Parallel:
    """What the training loop calls (``module``) and how its weights get back to ``student``."""

    strategy: str
    student: nn.Module
    module: nn.Module

    @property
    def trained(self) -> nn.Module:
        """The plain module being trained (the student, or its FSDP copy): hooks go there."""
        return self.module if self.strategy == "fsdp" else self.student

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict on every rank (a collective under FSDP: call it on every rank)."""
        if self.strategy != "fsdp":
            return self.student.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))

    def finish(self) -> None:
        """Trained weights into ``student``; every rank gets rank 0's buffers."""
        if self.strategy == "fsdp":
            full = self.state_dict()
            with torch.no_grad():
                for name, t in self.student.state_dict(keep_vars=True).items():
                    if name in full:
                        t.copy_(full[name].to(t.device))
        if self.strategy != "local":
            broadcast_tensors(list(self.student.buffers()))


def check_unwrapped(student: nn.Module) -> None:
    """Refuse a student already wrapped in DDP or FSDP (FSDP is checked only when loaded: a user
    who wrapped the student imported it), which graphprune would wrap a second time."""
    kinds: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel,)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kinds += tuple(getattr(fsdp, n) for n in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, n))
    if isinstance(student, kinds):
        raise InputError(
            f"recover: the student is already wrapped ({type(student).__name__}); pass the plain module "
            "and choose the wrapping with strategy='ddp' or 'fsdp'"
        )


def wrap(student: nn.Module, strategy: str) -> Parallel:
    """The student ready to train under ``strategy`` (see the module docstring)."""
    if strategy == "local":
        return Parallel(strategy, student, student)
    if not any(p.requires_grad for p in student.parameters()):
        raise InputError("recover: the student has no trainable parameter (all have requires_grad=False)")
    device = _device(student)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(student, device_ids=ids, static_graph=True)
        return Parallel(strategy, student, ddp)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(comm_device().type, (world_size(),))  # NCCL: the shards live on the GPUs
    work = copy.deepcopy(student)
    blocks: list[Any] = [
        child
        for mod in work.modules()
        if isinstance(mod, nn.ModuleList)
        for child in mod
        if any(True for _ in child.parameters())
    ]
    for block in reversed(blocks):  # innermost first, as fully_shard requires
        fully_shard(block, mesh=mesh)
    fully_shard(work, mesh=mesh)
    return Parallel(strategy, student, work)
