"""graphprune works on copies: the user's model and example inputs never change.

Why this module exists: a model's forward may write into its own parameters (``nn.Embedding``
with ``max_norm`` renormalises the rows it looks up, in place; ``self.conv.weight.clamp_()``
under ``no_grad``), update buffers (BatchNorm in train mode, spectral norm's power iteration)
or write into its input (``x.mul_(0.5)``). graphprune runs models many times (trace,
calibration, verification, export, FLOP counting), so every one of those runs happens on a
private copy, never on the caller's objects (inputs are copied by
``graph.inputs.normalize_inputs``, models here), and public calls give torch's global random
state back (``keeps_global_rng``) for forwards that draw random numbers.

Everything that copies a user's model goes through :func:`private_copy`, so a model that cannot
be copied gets one clear error naming the module, the attribute and the fix, instead of a raw
``TypeError: cannot pickle '_thread.lock' object`` from deep inside ``copy``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.graph.lookup import submodule
from graphprune.graph.modulecopy import module_deepcopy


def private_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` (training flags kept; ``copy.deepcopy``'s result, made faster by
    ``graph.modulecopy``); ``InputError`` naming what cannot be copied.

    ``memo`` is ``copy.deepcopy``'s: objects already mapped there are used instead of copied.
    """
    try:
        return module_deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - diagnosed below and re-raised as a clear error
        raise InputError(why_not_copyable(model, exc)) from exc


def eval_copy(model: nn.Module) -> nn.Module:
    """A private copy in eval mode (inference-time dropout and batch-norm statistics)."""
    work = private_copy(model)
    work.eval()
    return work


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters view the original's storage: no weight is copied.

    Every module, buffer and attribute is copied (buffers are small and a forward may update
    them); each parameter becomes a new ``nn.Parameter`` over the same memory, so replacing it
    (``param.data = sliced``, what surgery does) leaves the original's parameter as it was.
    Only for work that never writes a parameter in place: analysis runs the model only once its
    traced program is known not to write into its arguments (else it unshares first), and a
    tensor of the copy that still shares the original's storage at the end is cloned
    (``unshare``) before the copy is handed out. Tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return private_copy(model, memo)


def shared_eval_copy(model: nn.Module) -> nn.Module:
    """``shared_copy`` in eval mode: what analysis plans on (a 7B model is not held twice)."""
    work = shared_copy(model)
    work.eval()
    return work


def storages(model: nn.Module) -> set[int]:
    """Data pointers of the storages of ``model``'s parameters and buffers."""
    out = set()
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta and t.numel():
            out.add(t.untyped_storage().data_ptr())
    return out


def unshare(copy_: nn.Module, theirs: set[int]) -> None:
    """Clone the tensors of ``copy_`` whose storage is in ``theirs`` (``storages(original)``).

    What ``shared_copy`` shares and surgery did not slice (embeddings, norms) must not stay
    shared: training the compact model would otherwise write the user's weights.
    """
    if not theirs:
        return
    named = [*copy_.named_parameters(), *copy_.named_buffers()]
    for name, t in named:
        if not t.is_meta and t.numel() and t.untyped_storage().data_ptr() in theirs:
            mod_name, _, attr = name.rpartition(".")
            mod = submodule(copy_, mod_name)
            if isinstance(t, nn.Parameter):
                t.data = t.detach().clone()
            else:
                mod._buffers[attr] = t.clone()


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Give every submodule its own training flag back afterwards.

    ``model.train(old)`` would not do: a train-mode model may hold frozen, eval-mode BatchNorms.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


F = TypeVar("F", bound=Callable[..., Any])


def keeps_global_rng(fn: F) -> F:
    """Give torch's global random state back after ``fn``: a public call leaves it as it found it.

    A forward that draws random numbers (noise, sampling, ``randn_like`` in eval) consumes the
    global generator every time graphprune runs it (trace, verification, export...), so the
    caller's next ``torch.rand`` would depend on whether and how graphprune was called.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------
# Why a model cannot be copied
# ------------------------------------------------------------------------------------------

_PREFIX = (
    "graphprune works on a deep copy so that your model is never changed, and this model cannot be copied"
)


def _pre_hook_classes(module: nn.Module) -> set[str]:
    """Class names (and base class names) of the module's forward pre-hooks."""
    names: set[str] = set()
    for hook in module._forward_pre_hooks.values():
        names.update(base.__name__ for base in type(hook).__mro__)
    return names


def _problem(where: str, module: nn.Module, attr: str, value: Any, exc: BaseException) -> str:
    """What is wrong with ``module.attr`` and how to fix it."""
    if isinstance(value, torch.Tensor) and not value.is_leaf:
        hooks = _pre_hook_classes(module)
        if "WeightNorm" in hooks:
            return (
                f"{where} uses the old torch.nn.utils.weight_norm, whose {attr!r} is recomputed with "
                "autograd history that torch cannot deep-copy. Call "
                f"torch.nn.utils.remove_weight_norm(module, {attr!r}) before pruning (it folds g and v "
                "into the weight; apply weight_norm to the result again to train on). With "
                "torch.nn.utils.parametrizations.weight_norm the model can be copied, but the "
                "channels of a parametrized weight are kept whole."
            )
        if "BasePruningMethod" in hooks:
            return (
                f"{where} carries a torch.nn.utils.prune mask on {attr!r} ({attr}_orig * {attr}_mask), "
                "whose result torch cannot deep-copy. Fold the masks into the weights first: "
                f"torch.nn.utils.prune.remove(module, {attr!r}) for every pruned tensor."
            )
        return (
            f"{where} holds the tensor attribute {attr!r} computed with autograd history (not a leaf), "
            "which torch cannot deep-copy. Store it detached (`.detach()`), register it as a buffer, "
            "or compute it in forward."
        )
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return (
        f"{where} has the attribute {attr!r} of type {kind}, which cannot be deep-copied "
        f"({type(exc).__name__}: {exc}). Remove it before pruning (and set it again on the result), "
        "or give its class a __deepcopy__ that makes a fresh one."
    )


def _uncopyable(value: Any, name: str) -> tuple[str, Any, BaseException] | None:
    """(name, value, error) of the first part of ``value`` that deepcopy refuses; dicts (hooks)
    are searched by key so the error names the hook rather than the whole dict."""
    try:
        copy.deepcopy(value)
        return None
    except Exception as exc:  # noqa: BLE001 - this is what we are looking for
        if isinstance(value, Mapping):
            for key, item in value.items():
                found = _uncopyable(item, f"{name}[{key!r}]")
                if found is not None:
                    return found
        return name, value, exc


def why_not_copyable(model: nn.Module, exc: BaseException) -> str:
    """Find the first module attribute ``copy.deepcopy`` refuses and say how to fix it."""
    for path, module in model.named_modules():
        kind = type(module).__name__
        where = f"module {path!r} ({kind})" if path else f"the model itself ({kind})"
        own = {k: v for k, v in vars(module).items() if k not in ("_modules", "_parameters", "_buffers")}
        for attr, value in [*module._parameters.items(), *module._buffers.items(), *own.items()]:
            found = _uncopyable(value, attr)
            if found is not None:
                name, bad, error = found
                return f"{_PREFIX}: {_problem(where, module, name, bad, error)}"
    return f"{_PREFIX} ({type(exc).__name__}: {exc}). Remove what cannot be copied before pruning."
