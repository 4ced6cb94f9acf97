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
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.copies import eval_copy, kept_modes
from graphprune.graph.inputs import flatten_outputs
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
) -> nn.Module:
    """Train ``student`` (in place) for ``steps`` batches to imitate ``teacher``; return ``student``.

    ``data`` yields batches like a DataLoader (``(inputs, target)`` pairs - the target is
    ignored - or bare inputs); it is cycled if it has fewer than ``steps`` batches. The teacher
    (an eval-mode copy) runs without gradients and is not modified, nor are the batches; the
    student trains in train mode and every submodule gets its own mode back. Adam with learning
    rate ``lr`` unless ``optimizer`` is given. A tqdm progress bar shows the running loss
    (``progress=False`` hides it).
    """
    if loss not in ("kl", "mse"):
        raise InputError(f"loss must be 'kl' (logits) or 'mse' (outputs/features), got {loss!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if data is None:
        raise InputError("recover needs data: an iterable of batches (e.g. a DataLoader of the training set)")
    features = list(features or [])
    opt = optimizer or torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    teacher = eval_copy(teacher)  # its forward may write into its own weights: never the caller's
    device = model_device(student)
    s_feats: dict[str, torch.Tensor] = {}
    t_feats: dict[str, torch.Tensor] = {}
    handles = _capture(student, features, s_feats) + _capture(teacher, features, t_feats)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="recover (distillation)", leave=False)
    modes = contextlib.ExitStack()
    try:
        modes.enter_context(kept_modes(student))  # every submodule gets its own flag back
        student.train()
        it = iter(data)
        fresh = True
        step = 0
        while step < steps:
            try:
                batch = next(it)
                fresh = False
            except StopIteration:
                if fresh:
                    raise InputError("recover: data yielded no batches") from None
                it, fresh = iter(data), True
                continue
            inputs, _ = split_batch(to_device(batch, device))
            with torch.no_grad():
                t_out = forward(teacher, inputs)
            s_out = forward(student, inputs)
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
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value.item():.4g}")
            if on_step is not None:
                on_step(step, float(value.item()))
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
        modes.close()
    return student


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
