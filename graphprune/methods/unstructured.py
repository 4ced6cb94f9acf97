"""The classic methods, for users arriving with ``torch.nn.utils.prune`` habits.

Everything here **masks** weights: tensors keep their shapes, zeros are stored as zeros, and on
ordinary hardware (CPU, GPU dense kernels, onnxruntime) the model is exactly as large and as slow
as before - the docs (``docs/methods/``) show the measurements next to ``graphprune.compact``,
which removes whole channels and does get smaller and faster. These methods are still useful: to
study sparsity, to reproduce papers, and N:M masks feed sparse tensor cores (NVIDIA Ampere+ 2:4).

The masks use ``torch.nn.utils.prune``'s own mechanism (``weight_orig`` + ``weight_mask`` and a
forward pre-hook), so existing code that inspects them keeps working; :func:`make_permanent`
folds them in. Unlike ``torch.nn.utils.prune``, ``amount`` is the *final* sparsity of the tensor
(or of all tensors together, ``scope="global"``): already-zeroed weights count towards it, so
calling twice with 0.5 does not give 0.75.

All functions modify ``model`` in place (as ``torch.nn.utils.prune`` does) and return it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from graphprune.distributed import all_reduce_sum, together
from graphprune.errors import InputError
from graphprune.planning.calibration import (
    batches,
    compute_loss,
    forward,
    grads_enabled,
    model_device,
    split_batch,
    to_device,
)

Target = tuple[nn.Module, str]
_DEFAULT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def targets(model: nn.Module, params: Iterable[Any] | None = None) -> list[Target]:
    """The ``(module, "weight")`` pairs to prune: every Conv/Linear weight by default.

    ``params`` may list ``(module, name)`` pairs (as ``torch.nn.utils.prune.global_unstructured``
    takes) or module paths (``"layer1.0.conv1"``: its weight).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is None:
        out = [(m, "weight") for m in model.modules() if isinstance(m, _DEFAULT_TYPES)]
    else:
        out = []
        for p in params:
            if isinstance(p, str):
                try:
                    out.append((model.get_submodule(p), "weight"))
                except AttributeError as exc:
                    raise InputError(f"params: the model has no module {p!r}") from exc
            elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], nn.Module):
                out.append((p[0], str(p[1])))
            else:
                raise InputError(f"params entries are module paths or (module, name) pairs, got {p!r}")
    if not out:
        raise InputError("no tensor to prune: the model has no Conv/Linear layer (pass params=...)")
    return out


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    return hasattr(module, name + "_mask") and hasattr(module, name + "_orig")


def effective(module: nn.Module, name: str) -> torch.Tensor:
    """The weight as the forward pass uses it (original times mask)."""
    if is_masked(module, name):
        return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).detach()
    return getattr(module, name).detach()


def set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Install (or replace) the mask of ``module.name`` through torch.nn.utils.prune's mechanism."""
    mask = mask.to(dtype=effective(module, name).dtype)
    if is_masked(module, name):
        buf = getattr(module, name + "_mask")
        buf.copy_(mask)
        setattr(module, name, getattr(module, name + "_orig") * buf)
    else:
        tprune.custom_from_mask(module, name, mask)


def _keep_top(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Mask keeping the ``1 - amount`` share of highest scores (ties: lowest index wins)."""
    n = scores.numel()
    k = int(round(amount * n))
    mask = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.argsort(scores.reshape(-1).double(), stable=True)
        mask[order[:k]] = False
    return mask.reshape(scores.shape)


def _check_amount(amount: Any) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount <= 1:
        raise InputError(f"amount must be a fraction in [0, 1] (the final sparsity), got {amount!r}")
    return float(amount)


def _apply_scores(tgts: list[Target], scores: list[torch.Tensor], amount: float, scope: str) -> None:
    if scope not in ("local", "global"):
        raise InputError(f"scope must be 'local' (each tensor) or 'global' (all together), got {scope!r}")
    if scope == "local":
        for (mod, name), s in zip(tgts, scores):
            set_mask(mod, name, _keep_top(s, amount))
        return
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    mask = _keep_top(flat, amount)
    at = 0
    for (mod, name), s in zip(tgts, scores):
        set_mask(mod, name, mask[at : at + s.numel()].reshape(s.shape))
        at += s.numel()


def magnitude_prune(
    model: nn.Module, amount: float, *, scope: str = "local", p: int = 1, params: Iterable[Any] | None = None
) -> nn.Module:
    """Zero the ``amount`` share of smallest-magnitude weights, per tensor or globally.

    For single weights L1 and L2 rank identically (|w| vs w^2); ``p`` is accepted for symmetry
    with ``torch.nn.utils.prune.ln_structured`` habits.
    """
    amount = _check_amount(amount)
    tgts = targets(model, params)
    scores = [effective(m, n).abs().pow(p) for m, n in tgts]
    _apply_scores(tgts, scores, amount, scope)
    return model


def random_prune(
    model: nn.Module,
    amount: float,
    *,
    scope: str = "local",
    seed: int = 0,
    params: Iterable[Any] | None = None,
) -> nn.Module:
    """Zero a random ``amount`` share of weights (already-zeroed ones are kept zero first)."""
    amount = _check_amount(amount)
    tgts = targets(model, params)
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for m, n in tgts:
        w = effective(m, n)
        r = torch.rand(w.shape, generator=gen).to(w.device) + 1.0
        scores.append(torch.where(w == 0, torch.zeros_like(r), r))  # pruned ones stay pruned
    _apply_scores(tgts, scores, amount, scope)
    return model


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, *, params: Iterable[Any] | None = None) -> nn.Module:
    """N:M semi-structured sparsity: in every block of ``m`` consecutive input weights keep ``n``.

    Blocks run along the input-channel dimension (dim 1 of Conv/Linear weights), the layout
    sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later). A tensor whose input size is
    not a multiple of ``m`` is refused: name the others with ``params``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise InputError(f"N:M needs integers 0 < n <= m, got {n}:{m}")
    tgts = targets(model, params)
    for mod, name in tgts:
        w = effective(mod, name)
        if w.dim() < 2 or w.shape[1] % m:
            size = w.shape[1] if w.dim() > 1 else 1
            raise InputError(
                f"{type(mod).__name__} weight of shape {tuple(w.shape)}: input size {size} "
                f"is not a multiple of {m}; leave it out with params=[...]"
            )
        moved = w.abs().movedim(1, -1)  # (out, *k, in)
        blocks = moved.reshape(-1, m)
        order = torch.argsort(blocks, dim=1, descending=True, stable=True)
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, order[:, :n], True)
        set_mask(mod, name, keep.reshape(moved.shape).movedim(-1, 1))
    return model


def _tile_scores(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """L2 norm of every tile of ``shape`` over ``w`` (edge tiles may be smaller), per tile."""
    pads = []
    for size, tile in zip(reversed(w.shape), reversed(shape), strict=True):
        pads += [0, (-size) % tile]
    padded = torch.nn.functional.pad(w.detach().float().pow(2), pads)
    grid = [s // t for s, t in zip(padded.shape, shape, strict=True)]
    inter = [v for g, t in zip(grid, shape, strict=True) for v in (g, t)]
    perm = list(range(0, 2 * len(shape), 2)) + list(range(1, 2 * len(shape), 2))
    return padded.reshape(inter).permute(perm).reshape(*grid, -1).sum(-1).sqrt()


def _expand(mask: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    out = mask
    for d, tile in enumerate(shape):
        out = out.repeat_interleave(tile, dim=d)
    return out[tuple(slice(0, s) for s in like.shape)]


def kernel_prune(model: nn.Module, amount: float, *, scope: str = "local",
                 params: Iterable[Any] | None = None) -> nn.Module:
    """Zero whole k x k kernels (one input channel of one filter) with the smallest L2 norm.

    Only convolution weights have kernels (``(out, in, *k)``); Linear layers are left alone
    unless named in ``params`` (then each weight is one 1-element "kernel", i.e. magnitude).
    ``amount`` is the share of kernels zeroed, per tensor or over all (``scope="global"``).
    """
    amount = _check_amount(amount)
    tgts = [(m, n) for m, n in targets(model, params)
            if params is not None or isinstance(m, nn.modules.conv._ConvNd)]
    scores = [_tile_scores(effective(m, n), (1, 1, *effective(m, n).shape[2:])).reshape(
        effective(m, n).shape[:2]) for m, n in tgts]
    masks = _masks(scores, amount, scope)
    for (m, n), keep in zip(tgts, masks, strict=True):
        w = effective(m, n)
        set_mask(m, n, keep.reshape(*keep.shape, *([1] * (w.dim() - 2))).expand_as(w))
    return model


def block_prune(model: nn.Module, amount: float, block: int | tuple[int, int] = 4, *,
                scope: str = "local", params: Iterable[Any] | None = None) -> nn.Module:
    """Zero whole ``b x b`` blocks of weight matrices (block-sparse kernels' layout).

    A weight is seen as a matrix ``(out, in * k * k)``; edge blocks may be smaller and are
    scored by their own L2 norm. ``amount`` is the share of blocks zeroed.
    """
    amount = _check_amount(amount)
    bh, bw = (block, block) if isinstance(block, int) else block
    if not (isinstance(bh, int) and isinstance(bw, int) and bh > 0 and bw > 0):
        raise InputError(f"block must be a positive int or (rows, cols), got {block!r}")
    tgts = targets(model, params)
    mats = [effective(m, n).reshape(effective(m, n).shape[0], -1) for m, n in tgts]
    scores = [_tile_scores(w, (bh, bw)) for w in mats]
    masks = _masks(scores, amount, scope)
    for (m, n), w, keep in zip(tgts, mats, masks, strict=True):
        set_mask(m, n, _expand(keep, (bh, bw), w).reshape(effective(m, n).shape))
    return model


def _masks(scores: list[torch.Tensor], amount: float, scope: str) -> list[torch.Tensor]:
    if scope not in ("local", "global"):
        raise InputError(f"scope must be 'local' (each tensor) or 'global' (all together), got {scope!r}")
    if scope == "local":
        return [_keep_top(s, amount) for s in scores]
    flat = _keep_top(torch.cat([s.reshape(-1).double() for s in scores]), amount)
    out, at = [], 0
    for s in scores:
        out.append(flat[at : at + s.numel()].reshape(s.shape))
        at += s.numel()
    return out


def snip(
    model: nn.Module,
    data: Any,
    amount: float,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    params: Iterable[Any] | None = None,
    max_batches: int = 1,
) -> nn.Module:
    """SNIP (Lee et al., 2019): single-shot pruning by connection sensitivity |w * dL/dw|.

    Meant for a model at initialisation: one (or ``max_batches``) calibration batch gives the
    sensitivity of the loss to every connection; the ``amount`` share with the lowest
    sensitivity, ranked globally across tensors as in the paper, is masked before training.
    Under a torch.distributed process group the sensitivities are summed over the ranks' batches
    (``max_batches`` per rank), so every rank masks the same connections.
    """
    amount = _check_amount(amount)
    tgts = targets(model, params)
    device = model_device(model)
    sens = [torch.zeros_like(effective(mod, name)) for mod, name in tgts]
    was_training = model.training
    with together("snip on this rank's calibration data"), grads_enabled(model):
        tensors = [getattr(mod, name + ("_orig" if is_masked(mod, name) else "")) for mod, name in tgts]
        for batch in batches(data, "snip", max_batches):
            inputs, target = split_batch(to_device(batch, device))
            loss = compute_loss(loss_fn, forward(model, inputs), target, "snip")
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for i, ((mod, name), g) in enumerate(zip(tgts, grads)):
                if g is not None:
                    sens[i] += (g * effective(mod, name)).abs()
    model.train(was_training)
    sens = all_reduce_sum(sens, "snip sensitivities")  # every rank masks by all ranks' batches
    _apply_scores(tgts, sens, amount, "global")
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (``torch.nn.utils.prune.remove``): plain, zero-filled tensors."""
    for mod in model.modules():
        for name in [k[: -len("_mask")] for k in list(mod._buffers) if k.endswith("_mask")]:
            if is_masked(mod, name):
                tprune.remove(mod, name)
    return model


@dataclass
class SparsityReport:
    per_tensor: dict[str, tuple[int, int]]  # name -> (zeros, numel)

    @property
    def overall(self) -> float:
        zeros = sum(z for z, _ in self.per_tensor.values())
        total = sum(n for _, n in self.per_tensor.values())
        return zeros / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"{'tensor':<40} {'sparsity':>9}"]
        for name, (z, n) in self.per_tensor.items():
            lines.append(f"{name:<40} {z / n:>8.1%}")
        lines.append(f"{'overall':<40} {self.overall:>8.1%}")
        return "\n".join(lines)


def sparsity(model: nn.Module, params: Iterable[Any] | None = None) -> SparsityReport:
    """Fraction of exactly-zero entries in each pruned (or listed) weight, as the forward uses it."""
    names = {id(m): p for p, m in model.named_modules()}
    out = {}
    for mod, name in targets(model, params):
        w = effective(mod, name)
        key = f"{names.get(id(mod), '?')}.{name}".lstrip(".")
        out[key] = (int((w == 0).sum()), w.numel())
    return SparsityReport(out)


class RewindPoint:
    """Lottery-ticket rewinding (Frankle & Carbin, 2019; Frankle et al., 2020).

    Save the weights at initialisation (or early in training: "late rewinding"); after training
    and pruning, :meth:`rewind` puts the surviving weights back to those values while keeping the
    masks, so the sparse "ticket" can be retrained from there. The whole state (including
    biases and BN) is restored, as in the paper's experiments.
    """

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in _unmasked_state(model).items()}

    def rewind(self, model: nn.Module) -> nn.Module:
        current = _unmasked_state(model)
        missing = [k for k in self.state if k not in current]
        if missing:
            raise InputError(f"rewind: the model lacks tensors saved at the rewind point: {missing[:5]}")
        with torch.no_grad():
            for k, v in self.state.items():
                if current[k].shape != v.shape:
                    raise InputError(
                        f"rewind: {k} changed shape {tuple(v.shape)} -> {tuple(current[k].shape)}"
                    )
                current[k].copy_(v)
        for mod in model.modules():  # recompute masked weights from the rewound originals
            for name in [k[: -len("_mask")] for k in list(mod._buffers) if k.endswith("_mask")]:
                if is_masked(mod, name):
                    setattr(mod, name, getattr(mod, name + "_orig") * getattr(mod, name + "_mask"))
        return model


def _unmasked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, with ``x_orig`` reported as ``x`` and masks left out."""
    out: dict[str, torch.Tensor] = {}
    for k, v in itertools.chain(model.named_parameters(), model.named_buffers()):
        if k.endswith("_mask"):
            continue
        out[k[: -len("_orig")] if k.endswith("_orig") else k] = v
    return out


def find_ticket(
    model: nn.Module,
    train: Callable[[nn.Module], Any],
    *,
    sparsity_target: float = 0.8,
    rounds: int = 3,
    scope: str = "global",
    rewind_point: RewindPoint | None = None,
    params: Sequence[Any] | None = None,
) -> nn.Module:
    """Iterative magnitude pruning with rewinding: train, prune, rewind - ``rounds`` times.

    Round r prunes to sparsity ``1 - (1 - sparsity_target)^(r / rounds)`` (the same share of
    the survivors each round) and rewinds to ``rewind_point`` (default: the weights ``model``
    has now). Returns the ticket - masked and rewound, ready to be trained by the caller.
    """
    point = rewind_point or RewindPoint(model)
    sparsity_target = _check_amount(sparsity_target)
    for r in range(1, rounds + 1):
        train(model)
        magnitude_prune(model, 1 - (1 - sparsity_target) ** (r / rounds), scope=scope, params=params)
        point.rewind(model)
    return model


def masked_copy(model: nn.Module) -> nn.Module:
    """A deep copy with masks folded in (the original keeps its masks)."""
    return make_permanent(copy.deepcopy(model))
