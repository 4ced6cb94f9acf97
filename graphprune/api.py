"""The pipeline in one place: analyse -> plan -> surgery -> check -> (fallback) -> result."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.analysis import Analysis, analyze, check_attention, param_tensor
from graphprune.graph.inputs import normalize_inputs
from graphprune.graph.rules.attention import head_count_updates
from graphprune.graph.trace import check_model
from graphprune.planning.cut import CutOptions, check_options
from graphprune.planning.importance import Criterion, prepare_criterion, resolve
from graphprune.planning.plan import AttrUpdate, Plan, build_plan, check_ratio
from graphprune.reconstruct import hook as recon
from graphprune.surgery.fallback import (
    MAX_ROUNDS,
    Failure,
    Frozen,
    Replan,
    check_fallback,
    culprit,
    describe,
    error_message,
    find_failure,
    freeze_warning,
    graph_fallback,
    restrict_plan,
    same_class,
)
from graphprune.surgery.hf import update_config
from graphprune.surgery.sizes import Sizer, UncertainUpdate, attribute_updates, graph_constant_changes
from graphprune.surgery.slicing import apply_attr_updates, module_updates, replay, slice_tensors


def _importance_name(importance: str | Criterion) -> str:
    if isinstance(importance, str):
        return importance
    return getattr(importance, "name", None) or getattr(importance, "__name__", "custom")


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
    structure: dict[str, Any],
    *,
    data: Any = None,
    loss_fn: Any = None,
    options: CutOptions | None = None,
    fallback: str = "freeze",
    reconstruct: Any = False,
    progress: bool = False,
    verify: bool = False,
) -> tuple[Plan, nn.Module, Analysis]:
    """Plan, (reconstruct,) realise, (verify): (plan, model, analysis).

    With ``reconstruct`` the reference weights of the verification are the reconstructed
    full-size model (the analysis' model, left unsliced), not the user's.
    """
    check_model(model)
    ratio = check_ratio(ratio)
    fallback = check_fallback(fallback)
    if options is not None:
        check_options(options)
    rec = recon.check_request(reconstruct, data, example_input)  # bad data: refused before any work
    source, added = recon.prepare_model(model) if rec else (model, [])
    analysis, criterion = _prepare(
        source, example_input, importance, ignored_layers, data=data, loss_fn=loss_fn, **structure
    )
    name = _importance_name(importance)

    def planned(an: Analysis) -> Plan:
        plan = build_plan(an, ratio, criterion, name, options=options)
        if rec:
            plan = recon.reconstructed_plan(an, plan, data, rec, options, progress=progress)
        return plan

    def replan(prefixes: list[str]) -> tuple[Analysis, Plan]:
        """The same plan with ``prefixes`` frozen, as if the user had listed them in ignored_layers
        (a fresh analysis of the untouched user model; the criterion's measurements are reused)."""
        ignored = [*_as_list(ignored_layers), *prefixes]
        again = analyze(source, example_input, ignored_layers=ignored, **structure)
        return again, planned(again)

    plan = planned(analysis)
    small, plan, analysis = _realize_full(
        analysis, plan, example_input, fallback=fallback, replan=replan, copy_model=bool(rec)
    )
    if verify:
        from graphprune.verify import verify_compact

        verify_compact(analysis, plan, small, example_input, original=analysis.model if rec else model)
    if rec:
        recon.finish(small, plan, added)  # after verifying: the plan then forgets the unused biases
    return plan, small, analysis


def _as_list(ignored: Any) -> list[Any]:
    if ignored is None:
        return []
    if isinstance(ignored, (str, nn.Module)):
        return [ignored]
    return list(ignored)


def _prepare(
    model: nn.Module,
    example_input: Any,
    importance: str | Criterion,
    ignored_layers: Any,
    *,
    data: Any = None,
    loss_fn: Any = None,
    **structure: Any,
) -> tuple[Analysis, Criterion]:
    """Check the arguments and analyse once; plans for any number of ratios can follow.

    Data-driven criteria (taylor, hessian, activation...) refuse early when ``data`` is missing,
    then measure on the analysis' copy of the model (same parameter names as the plan uses).
    ``structure`` are the analysis options (``prune_hidden``, ``attention``).
    """
    check_model(model)
    check_attention(structure.get("attention", "heads"))
    criterion = resolve(importance, data=data, loss_fn=loss_fn, check_data=True)
    normalize_inputs(example_input)
    analysis = analyze(model, example_input, ignored_layers=ignored_layers, **structure)
    prepare_criterion(criterion, analysis.model, data, loss_fn)
    return analysis, criterion


def _realize(
    analysis: Analysis, plan: Plan, example_input: Any, *, copy_model: bool = False, fallback: str = "freeze"
) -> nn.Module:
    """Surgery for ``plan``: on ``analysis.model`` itself, or on a copy when more plans will follow.

    ``copy_model=True`` leaves the analysis reusable (its weights unsliced), which is what a search
    over ratios needs: analyse once, then build and realise a plan per candidate. When modules
    had to be kept whole (``fallback="freeze"``) ``plan`` is updated in place to describe the
    model returned; callers without a re-plan (the target search, Pruner, sensitivity) cut each
    group on its own, for which dropping the frozen units from the plan is the same as re-planning.
    """
    small, new_plan, _ = _realize_full(
        analysis, plan, example_input, copy_model=copy_model, fallback=fallback
    )
    if new_plan is not plan:
        plan.__dict__.update(new_plan.__dict__)
    return small


def _realize_full(
    analysis: Analysis,
    plan: Plan,
    example_input: Any,
    *,
    copy_model: bool = False,
    fallback: str = "freeze",
    replan: Replan | None = None,
) -> tuple[nn.Module, Plan, Analysis]:
    """Surgery, then the ``fallback`` if the user's class cannot run: (model, plan, analysis).

    ``replan(prefixes)`` returns a fresh (analysis, plan) with those modules frozen and every
    other option as before; without it the plan is restricted (``fallback.restrict_plan``),
    which needs the analysis' weights unsliced, so the surgery then works on a copy.
    """
    fallback = check_fallback(fallback)
    if fallback == "freeze" and replan is None:
        copy_model = True
    work, changes, failure = _surgery(analysis, plan, example_input, copy_model)
    if failure is None:
        return _finish(work, plan, example_input), plan, analysis
    model_cls = type(work).__name__
    if fallback == "error":
        path = culprit(work, failure.stack, set())
        raise GraphPruneError(error_message(model_cls, failure, path, work))
    why_not = ""
    if fallback == "freeze":
        got = _freeze(analysis, plan, example_input, work, failure, copy_model, replan)
        if not isinstance(got, str):
            return got
        why_not = got
    gm = graph_fallback(analysis, plan, changes, work, example_input, failure, why_not_freeze=why_not)
    return gm, plan, analysis


def _surgery(analysis: Analysis, plan: Plan, example_input: Any, copy_model: bool):
    """Slice, update attributes, run: (model, graph constant changes, Failure or None)."""
    work = copy.deepcopy(analysis.model) if copy_model else analysis.model
    plan.shapes = {name: list(param_tensor(work, name).shape) for name in plan.slices}
    removed = plan._removed_class  # type: ignore[attr-defined]
    sizer = Sizer(analysis, removed)
    changes = graph_constant_changes(analysis, sizer)
    attr_ups, notes = attribute_updates(analysis, changes, work)
    heads = head_count_updates(analysis, sizer, work, attr_ups)
    settled = {(u.module, u.attr) for u in heads}
    attr_ups = [u for u in attr_ups if (u.module, u.attr) not in settled] + heads
    plan.notes.extend(notes)
    # ambiguous attribute choices are judged by the plan's reference outputs (computed on the
    # unsliced weights), not by shapes alone: num_heads == head_dim == 2 runs either way
    reference = _reference_if_ambiguous(analysis, removed, work, attr_ups, example_input)
    slice_tensors(work, plan)
    mod_ups = module_updates(work)
    apply_attr_updates(work, mod_ups)
    attr_ups = _choose_attr_updates(
        work, attr_ups, example_input, analysis.traced.output_shapes, reference=reference
    )
    plan.attr_updates = mod_ups + attr_ups
    return work, changes, find_failure(work, example_input, analysis.traced.output_shapes)


def _finish(small: nn.Module, plan: Plan, example_input: Any) -> nn.Module:
    """Hugging Face: model.config describes the new widths where it can."""
    plan.notes.extend(update_config(small, plan, example_input))
    return small


def _freeze(analysis, plan, example_input, work, failure: Failure, copy_model: bool, replan):
    """Keep the failing modules' classes whole, round by round, until the user's class runs.

    Returns (model, plan, analysis), or a string saying why freezing did not help (the caller
    then falls back to the graph).
    """
    if replan is None:
        def replan(prefixes: list[str]) -> tuple[Analysis, Plan]:
            return analysis, restrict_plan(analysis, plan, prefixes)

    frozen: list[Frozen] = []
    for _ in range(MAX_ROUNDS):
        path = culprit(work, failure.stack, {f.cls for f in frozen})
        if path is None:
            if not frozen:
                return f"the failure is in {type(work).__name__}'s own forward, which cannot be kept whole"
            return f"keeping {describe(frozen)} whole was not enough: {failure.problem}"
        cls = type(work.get_submodule(path))
        frozen.append(Frozen(cls, path, failure.problem, same_class(work, cls)))
        new_analysis, new_plan = replan([p for f in frozen for p in f.paths])
        work, _, failure = _surgery(new_analysis, new_plan, example_input, copy_model)
        if failure is None:
            warnings.warn(freeze_warning(type(work).__name__, frozen), stacklevel=5)
            new_plan.notes.append(f"kept whole so that {type(work).__name__} runs at the new sizes: "
                                  f"{describe(frozen)}")
            return _finish(work, new_plan, example_input), new_plan, new_analysis
    return f"still failing after keeping {describe(frozen)} whole: {failure.problem}"


def _failing_modules(model: nn.Module, example_input: Any, expected) -> list[str] | None:
    """Run the model; return None if it works, else the paths of the modules active at failure."""
    failure = find_failure(model, example_input, expected)
    return None if failure is None else failure.stack


def _ambiguous_sets(ups: list[AttrUpdate]) -> list[list[AttrUpdate]]:
    sets: dict[tuple[str, Any, Any], list[AttrUpdate]] = {}
    for u in ups:
        sets.setdefault((u.module, u.old, u.new), []).append(u)
    return [g for g in sets.values() if len(g) > 1 or isinstance(g[0], UncertainUpdate)]


def _reference_if_ambiguous(analysis, removed, work, ups, example_input):
    """The plan's reference (verify.py, per layer), only when attribute choices need judging."""
    if not _ambiguous_sets(ups) or any(p.is_meta for p in work.parameters()):
        return None  # nothing to choose, or no values to compare (meta: shapes decide)
    from graphprune.verify import compute_reference

    try:
        return compute_reference(analysis, removed, work, example_input, per_module=True)
    except Exception:  # noqa: BLE001 - no reference: choose by shapes as before
        return None


def _subsets(g: list[AttrUpdate], smallest_first: bool) -> list[list[AttrUpdate]]:
    """Every subset of a small ambiguous set (sizes ascending or descending); else the old options."""
    from itertools import combinations

    if len(g) > 4:
        return [[]] + [[u] for u in g] if smallest_first else [list(g)] + [[u] for u in g] + [[]]
    sizes = range(len(g) + 1) if smallest_first else range(len(g), -1, -1)
    return [list(c) for k in sizes for c in combinations(g, k)]


def _per_module(ambiguous: list[list[AttrUpdate]], options: list[list[list[AttrUpdate]]]):
    """Merge the ambiguous sets of one module into one choice over their joint options.

    GQA with 4 q heads of width 4 and 2 kv heads: ``4 -> 2`` (num_heads or head_dim) and
    ``2 -> 1`` (num_kv_heads) must be chosen together; a walk that changes one set at a time
    can miss the only right pair (found by fuzzing). Joint options are ordered by how far they
    are from each set's first option, and capped.
    """
    from itertools import product

    by_module: dict[str, list[int]] = {}
    for k, g in enumerate(ambiguous):
        by_module.setdefault(g[0].module, []).append(k)
    groups, opts = [], []
    for ks in by_module.values():
        combos = sorted(product(*[range(len(options[k])) for k in ks]), key=sum)[:256]
        groups.append([u for k in ks for u in ambiguous[k]])
        opts.append([[u for k, i in zip(ks, c) for u in options[k][i]] for c in combos])
    return groups, opts


def _choose_attr_updates(
    work, ups: list[AttrUpdate], example_input, expected, reference: Any = None
) -> list[AttrUpdate]:
    """Apply the attribute updates found in the graph; resolve ambiguous ones by running the model.

    When two attributes of one module hold the same old value (GPT-2's Conv1D has ``nx == nf``)
    only some of them may be sizes that changed. Starting from "update all", each failure is
    traced to the innermost running module with an ambiguous choice, whose next option is tried:
    linear in the number of choices, not exponential. With a ``reference`` (verify.Reference) a
    trial that runs must also compute the plan's numbers; otherwise the first layer whose output
    differs is the failure location.
    """
    sets: dict[tuple[str, Any, Any], list[AttrUpdate]] = {}
    for u in ups:
        sets.setdefault((u.module, u.old, u.new), []).append(u)
    sure = [u for g in sets.values() if len(g) == 1 and not isinstance(g[0], UncertainUpdate) for u in g]
    ambiguous = [g for g in sets.values() if len(g) > 1 or isinstance(g[0], UncertainUpdate)]
    apply_attr_updates(work, ups)
    if not ambiguous:
        return ups
    # uncertain ones start from "leave it": applied only if the model needs them
    options = [_subsets(g, smallest_first=isinstance(g[0], UncertainUpdate)) for g in ambiguous]
    ambiguous, options = _per_module(ambiguous, options)
    choice = [0] * len(ambiguous)
    revert = [AttrUpdate(u.module, u.attr, u.new, u.old) for u in ups]
    for _ in range(sum(len(o) for o in options) + 1):
        trial = sure + [u for k, g in enumerate(options) for u in g[choice[k]]]
        apply_attr_updates(work, revert)
        apply_attr_updates(work, trial)
        failing = _failing_modules(work, example_input, expected)
        if failing is None and reference is not None:
            from graphprune.verify import first_mismatch

            wrong = first_mismatch(reference, work, example_input)  # runs, but are the numbers right?
            failing = None if wrong is None else ["", wrong[0]]
        if failing is None:
            return trial
        candidates = [
            k
            for k, g in enumerate(ambiguous)
            if choice[k] + 1 < len(options[k])
            and any(
                f == g[0].module or f.startswith(g[0].module + ".") or g[0].module.startswith(f)
                for f in failing[-1:]
            )
        ]
        if not candidates:
            candidates = [k for k in range(len(ambiguous)) if choice[k] + 1 < len(options[k])]
        if not candidates:
            break
        k = max(candidates, key=lambda k: len(ambiguous[k][0].module))
        choice[k] += 1
    apply_attr_updates(work, revert)
    apply_attr_updates(work, ups)
    return ups


def _modes(model: Any) -> dict[str, bool] | bool:
    """Train/eval flag of every submodule (a train-mode model may hold frozen, eval-mode BNs)."""
    if not isinstance(model, nn.Module):
        return False
    return {name: m.training for name, m in model.named_modules()}


def _set_mode(model: nn.Module, training: bool | dict[str, bool]) -> None:
    """Give the result the input model's train/eval modes, per submodule when given a dict.

    Graph fallbacks stay in eval.
    """
    flags = training if isinstance(training, dict) else {"": bool(training)}
    try:
        model.train(flags.get("", False))
    except NotImplementedError:
        return
    if isinstance(model, torch.fx.GraphModule) and isinstance(training, dict):
        return
    for name, m in model.named_modules():
        if name and name in flags:
            m.training = flags[name]


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
    training = _modes(model)
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
        _set_mode(small, training)
        return small
    ratio = 0.3 if ratio is None else ratio
    plan, small, analysis = _plan_and_model(
        model,
        example_input,
        ratio,
        importance,
        ignored_layers,
        {"prune_hidden": prune_hidden, "attention": attention},
        data=data,
        loss_fn=loss_fn,
        options=CutOptions(bool(global_pruning), max_ratio, ratios, round_to),
        fallback=fallback,
        reconstruct=reconstruct,
        progress=progress,
        verify=verify,
    )
    _set_mode(small, training)
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
    structure = {"prune_hidden": prune_hidden, "attention": attention}
    return _plan_and_model(
        model, example_input, ratio, importance, ignored_layers, structure, fallback=fallback, **cut
    )[0]


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
    training = _modes(model)
    targets = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("target_")}
    progress = kwargs.pop("progress", False)
    if any(v is not None for v in targets.values()):
        from graphprune.search.targets import targeted

        result = targeted(model, example_input, ratio, targets, verify=verify, progress=progress,
                          fallback=fallback, **kwargs)
        _set_mode(result.model, training)
        return result.model, result.plan
    ratio = 0.3 if ratio is None else ratio
    plan, small, analysis = _plan_and_model(
        model,
        example_input,
        ratio,
        kwargs.pop("importance", "l2"),
        kwargs.pop("ignored_layers", ()),
        {"prune_hidden": kwargs.pop("prune_hidden", False), "attention": kwargs.pop("attention", "heads")},
        **_where_to_cut(kwargs),
        fallback=fallback,
        progress=progress,
        verify=verify,
    )
    if kwargs:
        raise InputError(f"unexpected arguments: {sorted(kwargs)}")
    _set_mode(small, training)
    return small, plan
