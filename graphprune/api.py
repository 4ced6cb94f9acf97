"""The public one-call API: ``compact`` & co. build an ``Engine`` (engine.py), plan, realise, verify."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from graphprune.distributed import agree, digest, is_distributed
from graphprune.engine import Engine, Realized, importance_name, modes, realize_inplace, set_mode
from graphprune.errors import InputError, warn_user
from graphprune.graph.copies import keeps_global_rng, private_copy
from graphprune.graph.fasttrace import retried_with_export
from graphprune.graph.trace import check_model
from graphprune.methods.prune_masks import MaskImportance, fold_masks
from graphprune.planning.advice import nothing_removed
from graphprune.planning.importance import Criterion
from graphprune.planning.options import AUTO, CutOptions, StructureOptions
from graphprune.planning.plan import Plan, check_ratio
from graphprune.reconstruct import hook as recon
from graphprune.surgery.depth import remove_blocks
from graphprune.surgery.fallback import check_fallback
from graphprune.surgery.hf import update_config
from graphprune.surgery.plan_checks import check_plan_fits
from graphprune.surgery.rewrite import replay_rewrites
from graphprune.surgery.slicing import replay


def _where_to_cut(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the data and where-to-cut keywords (see graphprune.planning.cut) shared by compact & co."""
    opts = CutOptions(
        global_pruning=bool(kwargs.pop("global_pruning", False)),
        max_ratio=kwargs.pop("max_ratio", None),
        ratios=kwargs.pop("ratios", None),
        round_to=kwargs.pop("round_to", AUTO),
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
    ratio: float | None,
    importance: str | Criterion,
    ignored_layers: Any,
    structure: StructureOptions,
    *,
    data: Any = None,
    loss_fn: Any = None,
    options: CutOptions | None = None,
    fallback: str = "freeze",
    inplace: bool = False,
    reconstruct: Any = False,
    verify: bool = False,
    progress: bool = False,
) -> Realized:
    """One analysis, one plan, one surgery (with the fallback re-planning as compact documents),
    then the verification (``verify``) and, with ``reconstruct``, the unused added biases out.

    The result shares no memory with ``model``; with ``inplace`` it is ``model`` itself, shrunk
    (and verified here when ``verify``: the reference must be computed before slicing)."""
    check_model(model)
    bound = None if ratio is None else check_ratio(ratio)
    # importance="mask": the criterion's exact counts decide, a ratio only caps them
    ratio = (0.0 if isinstance(importance, MaskImportance) else 0.3) if bound is None else bound
    # ``fallback`` was checked by the public entry point
    rec = recon.check_request(reconstruct, data, example_input)  # bad data: refused before any work
    if inplace and rec:
        raise InputError(
            "compact(inplace=True) cannot reconstruct: the refit needs the original weights next to "
            "the compact ones. Leave out inplace=True, or pass reconstruct=False."
        )
    engine = Engine(
        model, example_input, importance=importance, ignored_layers=ignored_layers, structure=structure,
        data=data, loss_fn=loss_fn, reconstruct=rec, progress=progress,
    )
    plan = engine.plan(ratio, cut=options)
    if inplace:
        result = Realized(realize_inplace(model, engine.analysis, plan, example_input, verify), plan,
                          engine.analysis)
    else:
        result = engine.realize(plan, fallback=fallback, cut=options, last=True, verify=verify)
        engine.finish(result)
    if not isinstance(importance, MaskImportance):
        advice = nothing_removed(result.plan, engine.analysis, ratio, structure.prune_hidden)
        if advice:
            warn_user(advice)
    if is_distributed():  # every rank must hold the same plan (graphprune.distributed)
        # the decisions, not the notes: a note may describe this rank's run (what it warned about)
        decisions = {k: v for k, v in result.plan.to_dict().items() if k != "notes"}
        agree(digest(json.dumps(decisions, sort_keys=True)), "the plan",
              "The model, example input and statistics agreed, so a criterion or option is not "
              "deterministic; plan on one rank and use broadcast_plan.")
    return result


def _unmasked(
    model: nn.Module, importance: Any, ratio: float | None, **refused: Any
) -> tuple[nn.Module, Any, float | None]:
    """torch.nn.utils.prune masks folded into a copy (the user's model stays masked); "mask" resolved.

    Returns (model to prune, importance, ratio): every criterion then scores the effective weights;
    ``importance="mask"`` becomes a MaskImportance over the masks, whose ratio is only an upper
    bound (None: no bound), and which refuses options that would choose other units than the masks.
    """
    check_model(model)
    folded, masks = fold_masks(model)
    if not (isinstance(importance, str) and importance.lower() == "mask"):
        return folded, importance, ratio
    if not masks:
        raise InputError(
            "importance='mask' removes the units that torch.nn.utils.prune masks have emptied, and this "
            "model carries no such masks; prune it first (e.g. prune.ln_structured(conv, 'weight', "
            "amount=0.3, n=2, dim=0) on every conv) or use a weight criterion such as 'l2'."
        )
    # round_to="auto" is every call's default and exact counts bypass rounding, so it is no choice
    used = sorted(
        k for k, v in refused.items()
        if v not in (None, False, (), {}) and not (k == "round_to" and v in ("auto", 1))
    )
    if used:
        raise InputError(
            f"importance='mask' removes exactly the units the masks emptied; {', '.join(used)} would "
            "choose others. Leave them out (a ratio, if given, caps each group's removal)."
        )
    return folded, MaskImportance(masks, None if ratio is None else check_ratio(ratio)), ratio


@retried_with_export
@keeps_global_rng
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
    round_to: int | str | None = AUTO,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    progress: bool = False,
    fallback: str = "freeze",
    depth: float | int | None = None,
    depth_importance: str | None = None,
    depth_unit: str = "module",
    inplace: bool = False,
    reconstruct: Any = None,
) -> nn.Module:
    """Return a smaller copy of ``model`` with ``ratio`` of every prunable group's units removed.

    ``model`` is never modified. The result is the model's own class. ``ratio`` is the fraction of
    units (channels, heads, ...) removed from each coupled group, like torch.nn.utils.prune's
    ``amount``; each group keeps at least one unit.

    ``importance``: "l1", "l2" (default without ``data``), "random", "fpgm", "bn_scale", "lamp", or
    measured on calibration ``data`` (an iterable of ``(inputs, target)`` batches): "taylor" and "hessian"
    (need ``loss_fn(output, target)``), "activation", "apoz"; or any callable(group, model).
    A model carrying ``torch.nn.utils.prune`` masks is pruned as the effective (masked) weights;
    ``importance="mask"`` removes exactly the units the masks emptied (``ratio``, if given, caps
    each group) and folds every other mask (docs/methods/prune-masks.md).
    ``prune_hidden=True`` also prunes the residual stream (hidden size) of transformers.
    ``attention`` says what attention layers lose: "heads" (default; grouped-query attention loses
    whole KV groups with their q heads), "q_heads" (q heads evenly within each KV group, KV heads
    kept) or "head_dim" (the same channels inside every head; heads kept).
    ``global_pruning=True`` ranks all groups together (at most ``max_ratio`` of any group, 0.9 by
    default); ``ratios={"layer1": 0.5}`` sets per-module ratios. ``round_to="auto"`` (default)
    rounds each group's kept width to the nearest multiple that onnxruntime's CPU kernels run
    well (16 for convolution channels, narrower groups 8 or 4; Linear/MatMul widths exact), never
    more than one such step beyond the ratio; ``round_to=8`` keeps widths multiples of 8;
    ``round_to=1`` (or None) cuts exactly ``round(ratio * units)``. See docs/speed.md,
    graphprune.planning.cut and graphprune.planning.importance.

    Instead of ``ratio`` (default 0.3), give one target and the ratio is searched
    (graphprune.search.targets): ``target_flops`` / ``target_params`` (fraction of the original kept,
    met within 2 %), ``target_speedup`` / ``target_latency_ms`` (measured in onnxruntime);
    ``round_to="measured"`` then picks auto/1/8/16/32 by measured latency; ``progress=True`` shows a bar.

    ``fallback`` says what happens when a module's code cannot run at the new sizes (timm-style
    ``reshape(B, N, C)`` with ``C`` read off the input): "freeze" (default) rewrites only those
    submodules as graphs with the same parameter names where that verifies exact
    (docs/rewrite.md), else keeps every module of its class whole, prunes the rest and warns;
    "whole" keeps them whole without trying the rewrite; "graph" prunes everything and returns an fx
    GraphModule instead of your class; "error" raises GraphPruneError naming the module.

    ``depth`` first removes whole residual blocks (docs/depth.md): a fraction of the removable
    blocks (rounded) or a count; ``ratio`` then narrows what is left and defaults to 0 when
    ``depth`` is given. ``depth_importance`` ranks blocks: "weight" (default without ``data``)
    or "cosine" (default with ``data``). ``graphprune.find_blocks`` lists the blocks.
    ``depth="search"`` with one ``target_...`` tries several block counts, cuts widths to the
    target and keeps the best mix (graphprune.search.mix; the plan's notes say which won).

    Memory: the result never shares memory with ``model``; planning works on a copy that shares
    ``model``'s weights, so the peak is about ``model`` plus the compact model. ``inplace=True``
    (for a model you no longer need: a large LLM) returns ``model`` itself, shrunk: each sliced
    tensor replaces the old one as soon as it is made, so the peak is about ``model`` alone. There
    is no fallback then (a module that cannot run smaller is an error, and the model is lost).

    ``reconstruct=True`` (needs ``data``: model inputs or ``(inputs, target)`` batches, no labels
    needed) chooses each group's units by the reconstruction error of the layers that read them
    and refits those layers by ridge least squares, group by group on the already-compacted
    model, then re-estimates BatchNorm statistics; ``graphprune.ReconstructOptions(...)`` tunes
    it. It is the default when ``data`` is given and ``importance`` is not (it beat every plain
    criterion measured); pass ``reconstruct=False`` to only use the data for a criterion. See
    graphprune.reconstruct and docs/methods/reconstruction.md.
    """
    if depth is not None:
        return compact_with_plan(
            model, example_input, ratio, importance=importance, ignored_layers=ignored_layers,
            prune_hidden=prune_hidden, attention=attention, verify=verify, data=data, loss_fn=loss_fn,
            global_pruning=global_pruning, max_ratio=max_ratio, ratios=ratios, round_to=round_to,
            target_flops=target_flops, target_params=target_params, target_speedup=target_speedup,
            target_latency_ms=target_latency_ms, progress=progress, fallback=fallback, depth=depth,
            depth_importance=depth_importance, depth_unit=depth_unit)[0]
    check_fallback(fallback)
    importance, reconstruct = recon.defaults(importance, reconstruct, data)
    training = modes(model)
    targets = {"target_flops": target_flops, "target_params": target_params,
               "target_speedup": target_speedup, "target_latency_ms": target_latency_ms}
    model, importance, ratio = _unmasked(model, importance, ratio, global_pruning=global_pruning,
                                         ratios=ratios, round_to=round_to, **targets)
    if any(v is not None for v in targets.values()):
        from graphprune.search.targets import targeted

        if inplace:
            raise InputError("inplace=True works with ratio=, not with target_*: a search compacts "
                             "many candidates from the same original")
        small = targeted(model, example_input, ratio, targets, importance=importance,
                         ignored_layers=ignored_layers, prune_hidden=prune_hidden, attention=attention,
                         verify=verify,
                         data=data, loss_fn=loss_fn, global_pruning=global_pruning, max_ratio=max_ratio,
                         ratios=ratios, round_to=round_to, progress=progress, fallback=fallback,
                         reconstruct=reconstruct).model
        set_mode(small, training)
        return small
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
        inplace=inplace,
        reconstruct=reconstruct,
        verify=verify,
        progress=progress,
    )
    set_mode(small, training)
    return small


@retried_with_export
@keeps_global_rng
def make_plan(
    model: nn.Module,
    example_input: Any,
    ratio: float | None = None,
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
    max_ratio, ratios, round_to) and its depth keywords (depth, depth_importance, depth_unit).
    ``fallback="freeze"`` (default) returns the plan whose replay runs in your class (modules
    that cannot run smaller kept whole, see ``compact``).
    """
    check_fallback(fallback)
    if where.get("depth") is not None:  # blocks first, then widths: the plan carries both
        return compact_with_plan(model, example_input, ratio, importance=importance,
                                 ignored_layers=ignored_layers, prune_hidden=prune_hidden,
                                 attention=attention, fallback=fallback, **where)[1]
    where.pop("depth", None)
    cut = _where_to_cut(where)
    if where:
        raise InputError(f"unexpected arguments: {sorted(where)}")
    opts = cut["options"]
    model, importance, ratio = _unmasked(model, importance, ratio, global_pruning=opts.global_pruning,
                                         ratios=opts.ratios, round_to=opts.round_to)
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
    model = fold_masks(model)[0]  # a copy with torch.nn.utils.prune masks folded in, if any
    small = private_copy(model)
    remove_blocks(small, plan)  # the width plan was made on the shallower model
    check_plan_fits(small, plan)
    replay(small, plan)
    replay_rewrites(small, plan)  # submodules rewritten as graphs (docs/rewrite.md)
    update_config(small, plan)
    return small


@retried_with_export
@keeps_global_rng
def compact_with_plan(model, example_input, ratio=None, **kwargs) -> tuple[nn.Module, Plan]:
    """Like ``compact`` but also return the plan (for printing or saving)."""
    depth, depth_importance = kwargs.pop("depth", None), kwargs.pop("depth_importance", None)
    depth_unit = kwargs.pop("depth_unit", "module")
    if isinstance(depth, str) and depth == "search":
        from graphprune.search.mix import search_mix

        targets = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("target_")}
        result = search_mix(model, example_input, targets, ratio=ratio, depth_importance=depth_importance,
                            depth_unit=depth_unit, **kwargs)
        return result.model, result.plan
    if depth is not None:
        return _depth_then_width(model, example_input, ratio, depth, depth_importance, depth_unit, kwargs)
    verify = kwargs.pop("verify", True)
    inplace = bool(kwargs.pop("inplace", False))
    fallback = check_fallback(kwargs.pop("fallback", "freeze"))
    kwargs["importance"], kwargs["reconstruct"] = recon.defaults(
        kwargs.get("importance"), kwargs.get("reconstruct"), kwargs.get("data")
    )
    training = modes(model)
    targets = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("target_")}
    progress = kwargs.pop("progress", False)
    model, importance, ratio = _unmasked(
        model, kwargs.pop("importance", "l2"), ratio, global_pruning=kwargs.get("global_pruning"),
        ratios=kwargs.get("ratios"), round_to=kwargs.get("round_to"), **targets,
    )
    kwargs["importance"] = importance
    if any(v is not None for v in targets.values()):
        from graphprune.search.targets import targeted

        result = targeted(model, example_input, ratio, targets, verify=verify, progress=progress,
                          fallback=fallback, **kwargs)
        set_mode(result.model, training)
        return result.model, result.plan
    small, plan, analysis = _plan_and_model(
        model,
        example_input,
        ratio,
        kwargs.pop("importance"),
        kwargs.pop("ignored_layers", ()),
        StructureOptions(kwargs.pop("attention", "heads"), kwargs.pop("prune_hidden", False)),
        **_where_to_cut(kwargs),
        fallback=fallback,
        inplace=inplace,
        verify=verify,
        progress=progress,
    )
    if kwargs:
        raise InputError(f"unexpected arguments: {sorted(kwargs)}")
    set_mode(small, training)
    return small, plan


def _depth_then_width(model: nn.Module, example_input: Any, ratio: float | None, depth: float | int,
                      depth_importance: str | None, depth_unit: str, kwargs: dict[str, Any]
                      ) -> tuple[nn.Module, Plan]:
    """Remove blocks (graphprune.depth), then cut widths of what is left; one plan for both.

    The width plan is made on the shallower model, so replaying it needs the blocks removed
    first: ``plan.depth`` lists them and ``apply_plan`` / ``graphprune.load`` remove them first.
    A ``target_...`` still describes the whole model (graphprune.search.mix.remaining_target).
    """
    from graphprune.depth import prune_depth

    check_fallback(kwargs.get("fallback", "freeze"))
    training = modes(model)
    result = prune_depth(model, example_input, depth, importance=depth_importance, data=kwargs.get("data"),
                         ignored_layers=kwargs.get("ignored_layers", ()), verify=kwargs.get("verify", True),
                         unit=depth_unit)
    targets = {k: v for k, v in kwargs.items() if k.startswith("target_") and v is not None}
    if len(targets) == 1:  # a target describes the whole model: what is left for the widths
        from graphprune.search.mix import remaining_target

        kind, value = next(iter(targets.items()))
        rest, done = remaining_target(kind, value, model, result.model, example_input)
        kwargs[kind] = None if done else rest
    width = any(kwargs.get(k) is not None for k in kwargs if k.startswith("target_")) or bool(ratio)
    if width:
        kwargs["ignored_layers"] = result.ignored
        small, plan = compact_with_plan(result.model, example_input, ratio, **kwargs)
    else:
        unknown = set(kwargs) - _COMPACT_KEYWORDS
        if unknown:
            raise InputError(f"unexpected arguments: {sorted(unknown)}")
        small = result.model
        plan = Plan(ratio=0.0, importance=importance_name(kwargs.get("importance", "l2")))
    plan.depth = [e.to_dict() for e in result.entries]
    plan.notes[:0] = result.notes
    set_mode(small, training)
    return small, plan


_COMPACT_KEYWORDS = {
    "importance", "ignored_layers", "prune_hidden", "attention", "verify", "data", "loss_fn",
    "global_pruning", "max_ratio", "ratios", "round_to", "target_flops", "target_params",
    "target_speedup", "target_latency_ms", "progress", "fallback",
}
