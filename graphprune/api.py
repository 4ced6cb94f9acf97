"""The public one-call API: ``compact`` & co. build an ``Engine`` (engine.py), plan, realise, verify."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from graphprune.engine import Engine, Realized, modes, set_mode
from graphprune.errors import InputError
from graphprune.graph.trace import check_model
from graphprune.planning.importance import Criterion
from graphprune.planning.options import CutOptions, StructureOptions
from graphprune.planning.plan import Plan, check_ratio
from graphprune.reconstruct import hook as recon
from graphprune.surgery.fallback import check_fallback
from graphprune.surgery.hf import update_config
from graphprune.surgery.slicing import replay


def _where_to_cut(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the data and where-to-cut keywords (see graphprune.planning.cut) shared by compact & co."""
    opts = CutOptions(
        global_pruning=bool(kwargs.pop("global_pruning", False)),
        max_ratio=kwargs.pop("max_ratio", None),
        ratios=kwargs.pop("ratios", None),
        round_to=kwargs.pop("round_to", None),
    )
    return {
        "data": kwargs.pop("data", None),
        "loss_fn": kwargs.pop("loss_fn", None),
        "options": opts,
        "reconstruct": kwargs.pop("reconstruct", None),
    }


def _plan_and_model(
    model: nn.Module,
    example_input: Any,
    ratio: float,
    importance: str | Criterion,
    ignored_layers: Any,
    structure: StructureOptions,
    *,
    data: Any = None,
    loss_fn: Any = None,
    options: CutOptions | None = None,
    fallback: str = "freeze",
    reconstruct: Any = False,
    verify: bool = False,
    progress: bool = False,
) -> Realized:
    """One analysis, one plan, one surgery (with the fallback re-planning as compact documents),
    then the verification (``verify``) and, with ``reconstruct``, the unused added biases out."""
    check_model(model)
    ratio = check_ratio(ratio)  # ``fallback`` was checked by the public entry point
    rec = recon.check_request(reconstruct, data, example_input)  # bad data: refused before any work
    engine = Engine(
        model, example_input, importance=importance, ignored_layers=ignored_layers, structure=structure,
        data=data, loss_fn=loss_fn, reconstruct=rec, progress=progress,
    )
    result = engine.realize(engine.plan(ratio, cut=options), fallback=fallback, cut=options, last=True)
    if verify:
        engine.verify(result)
    engine.finish(result)
    return result


def compact(
    model: nn.Module,
    example_input: Any,
    ratio: float | None = None,
    *,
    importance: str | Criterion | None = None,
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    verify: bool = True,
    data: Any = None,
    loss_fn: Any = None,
    global_pruning: bool = False,
    max_ratio: float | None = None,
    ratios: dict[str | int, float] | None = None,
    round_to: int | str | None = None,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    progress: bool = False,
    fallback: str = "freeze",
    reconstruct: Any = None,
) -> nn.Module:
    """Return a smaller copy of ``model`` with ``ratio`` of every prunable group's units removed.

    ``model`` is never modified. The result is the model's own class. ``ratio`` is the fraction of
    units (channels, heads, ...) removed from each coupled group, like torch.nn.utils.prune's
    ``amount``; each group keeps at least one unit.

    ``importance``: "l1", "l2" (default without ``data``), "random", "fpgm", "bn_scale", "lamp", or
    measured on calibration ``data`` (an iterable of ``(inputs, target)`` batches): "taylor" and "hessian"
    (need ``loss_fn(output, target)``), "activation", "apoz"; or any callable(group, model).
    ``prune_hidden=True`` also prunes the residual stream (hidden size) of transformers.
    ``attention`` says what attention layers lose: "heads" (default; grouped-query attention loses
    whole KV groups with their q heads), "q_heads" (q heads evenly within each KV group, KV heads
    kept) or "head_dim" (the same channels inside every head; heads kept).
    ``global_pruning=True`` ranks all groups together (at most ``max_ratio`` of any group, 0.9 by
    default); ``ratios={"layer1": 0.5}`` sets per-module ratios; ``round_to=8`` keeps widths
    multiples of 8. See graphprune.planning.cut and graphprune.planning.importance.

    Instead of ``ratio`` (default 0.3), give one target and the ratio is searched
    (graphprune.search.targets): ``target_flops`` / ``target_params`` (fraction of the original kept,
    met within 2 %), ``target_speedup`` / ``target_latency_ms`` (measured in onnxruntime);
    ``round_to="measured"`` then picks 1/8/16/32 by measured latency; ``progress=True`` shows a bar.

    ``fallback`` says what happens when a module's code cannot run at the new sizes (timm-style
    ``reshape(B, N, C)`` with ``C`` read off the input): "freeze" (default) keeps every module
    of its class whole, prunes the rest and warns; "graph" prunes everything and returns an fx
    GraphModule instead of your class; "error" raises GraphPruneError naming the module.

    ``reconstruct=True`` (needs ``data``: model inputs or ``(inputs, target)`` batches, no labels
    needed) chooses each group's units by the reconstruction error of the layers that read them
    and refits those layers by ridge least squares, group by group on the already-compacted
    model, then re-estimates BatchNorm statistics; ``graphprune.ReconstructOptions(...)`` tunes
    it. It is the default when ``data`` is given and ``importance`` is not (it beat every plain
    criterion measured); pass ``reconstruct=False`` to only use the data for a criterion. See
    graphprune.reconstruct and docs/methods/reconstruction.md.
    """
    check_fallback(fallback)
    importance, reconstruct = recon.defaults(importance, reconstruct, data)
    training = modes(model)
    targets = {"target_flops": target_flops, "target_params": target_params,
               "target_speedup": target_speedup, "target_latency_ms": target_latency_ms}
    if any(v is not None for v in targets.values()):
        from graphprune.search.targets import targeted

        small = targeted(model, example_input, ratio, targets, importance=importance,
                         ignored_layers=ignored_layers, prune_hidden=prune_hidden, attention=attention,
                         verify=verify,
                         data=data, loss_fn=loss_fn, global_pruning=global_pruning, max_ratio=max_ratio,
                         ratios=ratios, round_to=round_to, progress=progress, fallback=fallback,
                         reconstruct=reconstruct).model
        set_mode(small, training)
        return small
    ratio = 0.3 if ratio is None else ratio
    small, plan, analysis = _plan_and_model(
        model,
        example_input,
        ratio,
        importance,
        ignored_layers,
        StructureOptions(attention, prune_hidden),
        data=data,
        loss_fn=loss_fn,
        options=CutOptions(bool(global_pruning), max_ratio, ratios, round_to),
        fallback=fallback,
        reconstruct=reconstruct,
        verify=verify,
        progress=progress,
    )
    set_mode(small, training)
    return small


def make_plan(
    model: nn.Module,
    example_input: Any,
    ratio: float = 0.3,
    *,
    importance: str | Criterion | None = None,
    ignored_layers: Any = (),
    prune_hidden: bool = False,
    attention: str = "heads",
    fallback: str = "freeze",
    **where: Any,
) -> Plan:
    """Analyse and plan without returning a model (the plan replays with ``apply_plan``).

    ``where`` takes compact's data / where-to-cut keywords (data, loss_fn, global_pruning,
    max_ratio, ratios, round_to). ``fallback="freeze"`` (default) returns the plan whose
    replay runs in your class (modules that cannot run smaller kept whole, see ``compact``).
    """
    check_fallback(fallback)
    cut = _where_to_cut(where)
    if where:
        raise InputError(f"unexpected arguments: {sorted(where)}")
    importance, cut["reconstruct"] = recon.defaults(importance, cut["reconstruct"], cut["data"])
    structure = StructureOptions(attention, prune_hidden)
    return _plan_and_model(
        model, example_input, ratio, importance, ignored_layers, structure, fallback=fallback, **cut
    ).plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Replay ``plan`` on a copy of ``model`` (no tracing): slices plus attribute updates."""
    check_model(model)
    if not isinstance(plan, Plan):
        raise InputError(f"plan must be a graphprune.Plan, got {type(plan).__name__}")
    small = copy.deepcopy(model)
    replay(small, plan)
    update_config(small, plan)
    return small


def compact_with_plan(model, example_input, ratio=None, **kwargs) -> tuple[nn.Module, Plan]:
    """Like ``compact`` but also return the plan (for printing or saving)."""
    verify = kwargs.pop("verify", True)
    fallback = check_fallback(kwargs.pop("fallback", "freeze"))
    kwargs["importance"], kwargs["reconstruct"] = recon.defaults(
        kwargs.get("importance"), kwargs.get("reconstruct"), kwargs.get("data")
    )
    training = modes(model)
    targets = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("target_")}
    progress = kwargs.pop("progress", False)
    if any(v is not None for v in targets.values()):
        from graphprune.search.targets import targeted

        result = targeted(model, example_input, ratio, targets, verify=verify, progress=progress,
                          fallback=fallback, **kwargs)
        set_mode(result.model, training)
        return result.model, result.plan
    ratio = 0.3 if ratio is None else ratio
    small, plan, analysis = _plan_and_model(
        model,
        example_input,
        ratio,
        kwargs.pop("importance", "l2"),
        kwargs.pop("ignored_layers", ()),
        StructureOptions(kwargs.pop("attention", "heads"), kwargs.pop("prune_hidden", False)),
        **_where_to_cut(kwargs),
        fallback=fallback,
        verify=verify,
        progress=progress,
    )
    if kwargs:
        raise InputError(f"unexpected arguments: {sorted(kwargs)}")
    set_mode(small, training)
    return small, plan
