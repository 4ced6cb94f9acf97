"""Recovery after compaction: knowledge distillation from the original model.

A compact model starts close to the original (the removed units were the least important) but
not equal to it. The cheapest way back is to train it to imitate the original - no labels
needed, and the teacher's soft outputs carry more information per sample than hard labels.

``loss="kl"``: KL divergence between temperature-softened output distributions (Hinton et al.,
2015), scaled by ``T^2`` so gradients keep their size whatever the temperature; for every output
tensor, over its last dimension (logits). ``loss="mse"``: mean squared error between outputs
(regression heads, embeddings). ``features=["layer3", ...]`` adds an MSE between the outputs of
those modules in student and teacher (the modules must keep their output shape, e.g. residual
stream blocks of a transformer whose hidden size was not pruned).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.distributed import barrier, check_same, is_main, local, mean_over_ranks, together
from graphprune.errors import InputError
from graphprune.graph.copies import eval_copy, kept_modes
from graphprune.graph.inputs import flatten_outputs
from graphprune.methods.parallel import check_unwrapped, resolve_strategy, wrap
from graphprune.planning.calibration import forward, model_device, split_batch, to_device


def distillation_loss(
    student_out: Any, teacher_out: Any, loss: str = "kl", temperature: float = 2.0
) -> torch.Tensor:
    """The distillation loss between two model outputs (same structure and shapes)."""
    s_list, t_list = flatten_outputs(student_out), flatten_outputs(teacher_out)
    if len(s_list) != len(t_list) or not s_list:
        raise InputError(
            f"student and teacher outputs differ in structure ({len(s_list)} vs {len(t_list)} tensors)"
        )
    terms = []
    for s, t in zip(s_list, t_list):
        if s.shape != t.shape:
            raise InputError(f"student output shape {tuple(s.shape)} != teacher's {tuple(t.shape)}")
        if not s.is_floating_point():
            continue
        if loss == "kl":
            log_p = F.log_softmax(s.float() / temperature, dim=-1)
            log_q = F.log_softmax(t.float() / temperature, dim=-1)
            n = s.shape[-1]
            kl = F.kl_div(log_p.reshape(-1, n), log_q.reshape(-1, n), reduction="batchmean", log_target=True)
            terms.append(kl * temperature**2)
        else:
            terms.append(F.mse_loss(s.float(), t.float()))
    if not terms:
        raise InputError("the models return no floating-point output to distil")
    return torch.stack(terms).sum()


def _capture(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list[Any]:
    handles = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"features: the model has no module {name!r}") from exc

        def hook(m: nn.Module, a: Any, out: Any, key: str = name) -> None:
            outs = flatten_outputs(out)
            if outs:
                store[key] = outs[0]

        handles.append(mod.register_forward_hook(hook))
    return handles


_NOTHING = object()


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    steps: int = 100,
    *,
    loss: str = "kl",
    lr: float = 1e-3,
    temperature: float = 2.0,
    features: list[str] | None = None,
    feature_weight: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], Any] | None = None,
    strategy: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
) -> nn.Module:
    """Train ``student`` (in place) for ``steps`` batches to imitate ``teacher``; return ``student``.

    ``data`` yields batches like a DataLoader (``(inputs, target)`` pairs - the target is
    ignored - or bare inputs); it is cycled if it has fewer than ``steps`` batches. The teacher
    (an eval-mode copy) runs without gradients and is not modified, nor are the batches; the
    student trains in train mode and every submodule gets its own mode back. Adam with learning
    rate ``lr`` unless ``optimizer`` is given. A tqdm progress bar shows the running loss
    (``progress=False`` hides it).

    Under an initialised torch.distributed process group of two or more ranks (``torchrun``)
    training is data-parallel (see graphprune.methods.parallel and docs/distributed.md): each
    rank reads its own ``data``, gradients are averaged, and every rank ends with the same
    weights. ``strategy``: ``None``/"auto" (DDP under a process group, else this process alone),
    "ddp", "fsdp" (parameters, gradients and optimiser state sharded; ``optimizer`` not
    accepted, the Adam made from ``lr`` is built on the shards), "local" (no collective).
    The student and teacher must be the same on every rank (checked). The progress bar is
    shown on rank 0 only; ``on_step(step, loss)`` runs on every rank with the loss averaged
    over ranks. ``checkpoint="path.pt"`` saves ``{"step", "state_dict"}`` (rank 0 writes, once,
    atomically) every ``checkpoint_every`` steps (0: only at the end).
    """
    if loss not in ("kl", "mse"):
        raise InputError(f"loss must be 'kl' (logits) or 'mse' (outputs/features), got {loss!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise InputError(f"checkpoint_every must be a non-negative integer, got {checkpoint_every!r}")
    if data is None:
        raise InputError("recover needs data: an iterable of batches (e.g. a DataLoader of the training set)")
    strategy = resolve_strategy(strategy)
    check_unwrapped(student)
    if strategy == "fsdp" and optimizer is not None:
        raise InputError(
            "recover(strategy='fsdp') builds its optimiser on the sharded parameters: leave optimizer= "
            "out (Adam with lr=) or use strategy='ddp', which keeps your optimizer's parameters."
        )
    features = list(features or [])
    # "local": no collective at all; kept_modes: every submodule of the student gets its own flag back
    with local() if strategy == "local" else contextlib.nullcontext(), kept_modes(student):
        check_same("recover", student=student, teacher=teacher)
        with together("recover: reading the first batch of this rank's data"):
            it = iter(data)
            first = next(it, _NOTHING) if steps else _NOTHING
            if steps and first is _NOTHING:
                raise InputError(
                    "recover: data yielded no batches; give every rank at least one batch "
                    "(with a DistributedSampler, at least as many samples as ranks)"
                )
        par = wrap(student, strategy)
        opt = optimizer or torch.optim.Adam([p for p in par.parameters() if p.requires_grad], lr=lr)
        teacher = eval_copy(teacher)  # its forward may write into its own weights: never the caller's
        par.module.train()
        device = model_device(par.trained)
        s_feats: dict[str, torch.Tensor] = {}
        t_feats: dict[str, torch.Tensor] = {}
        handles = _capture(par.trained, features, s_feats) + _capture(teacher, features, t_feats)
        bar = None
        if progress and is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"recover (distillation, {strategy})", leave=False)
        try:
            for step, batch in zip(range(1, steps + 1), _cycle(data, it, first)):
                inputs, _ = split_batch(to_device(batch, device))
                with torch.no_grad():
                    t_out = forward(teacher, inputs)
                s_out = forward(par.module, inputs)
                value = distillation_loss(s_out, t_out, loss, temperature)
                for name in features:
                    s, t = s_feats.get(name), t_feats.get(name)
                    if s is None or t is None:
                        raise InputError(f"features: module {name!r} did not run")
                    if s.shape != t.shape:
                        raise InputError(
                            f"features: {name!r} has shape {tuple(s.shape)} in the student and "
                            f"{tuple(t.shape)} in the teacher; pick modules whose output size was kept"
                        )
                    value = value + feature_weight * F.mse_loss(s.float(), t.detach().float())
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                shown = mean_over_ranks(float(value.item()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{shown:.4g}")
                if on_step is not None:
                    on_step(step, shown)
                due = step == steps or (checkpoint_every and step % checkpoint_every == 0)
                if checkpoint is not None and due:
                    save_checkpoint(checkpoint, step, par.state_dict())
            par.finish()
        finally:
            for h in handles:
                h.remove()
            if bar is not None:
                bar.close()
    return student


def _cycle(data: Iterable[Any], it: Iterator[Any], first: Any) -> Iterator[Any]:
    """``first``, the rest of ``it``, then ``data`` again and again (refusing one that has run dry)."""
    yield first
    while True:
        yield from it
        it = iter(data)
        try:
            yield next(it)
        except StopIteration:
            raise InputError(
                "recover: data yielded no batches when read again; pass a re-iterable (a list or a "
                "DataLoader), not a one-shot generator, or steps <= the number of batches"
            ) from None


def save_checkpoint(path: str | Path, step: int, state: dict[str, torch.Tensor]) -> None:
    """``{"step", "state_dict"}`` to ``path``, written by rank 0 only and atomically (temp + rename),
    so a crash mid-write never leaves a truncated checkpoint where a good one was."""
    if is_main():
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, tmp)
        os.replace(tmp, path)
    barrier()


def evaluate_distillation(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    loss: str = "kl",
    temperature: float = 2.0,
    max_batches: int | None = None,
) -> float:
    """Mean distillation loss of ``student`` against ``teacher`` over ``data`` (eval mode, no grad)."""
    student, teacher = eval_copy(student), eval_copy(teacher)  # measuring changes neither
    device = model_device(student)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in itertools.islice(data, max_batches):
            inputs, _ = split_batch(to_device(batch, device))
            out_s, out_t = forward(student, inputs), forward(teacher, inputs)
            total += float(distillation_loss(out_s, out_t, loss, temperature))
            n += 1
    if n == 0:
        raise InputError("evaluate_distillation: data yielded no batches")
    return total / n
