"""The engine: analyse a model once, then plan and realise (with fallback) any number of times.

``Engine`` is the object; the functions below are its steps, used directly by the searches that
keep their own analysis (``search.targets``, ``search.pruner``, ``search.sensitivity``):

* ``prepare``: check the arguments, trace and analyse, let a data-driven criterion measure;
* ``realize`` / ``realize_full``: surgery on (a copy of) the analysed model, and when the user's
  class cannot run at the new sizes, the ``fallback`` (freeze the failing modules' classes and
  re-plan, or return an fx GraphModule, or raise).

No step changes the user's model or a caller's plan: a realised plan is a new object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from graphprune.distributed import check_same, together
from graphprune.errors import GraphPruneError, VerificationError, warn_user
from graphprune.graph.analysis import Analysis, analyze, param_tensor
from graphprune.graph.copies import keeps_global_rng, private_copy, shared_copy, unshare
from graphprune.graph.inputs import normalize_inputs
from graphprune.graph.trace import check_model
from graphprune.planning.importance import Criterion, prepare_criterion, resolve
from graphprune.planning.options import CutOptions, StructureOptions
from graphprune.planning.plan import Plan, build_plan
from graphprune.reconstruct import hook as recon
from graphprune.reconstruct.run import ReconstructOptions
from graphprune.surgery.attributes import choose_attr_updates, reference_if_ambiguous
from graphprune.surgery.fallback import (
    FIX,
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
from graphprune.surgery.heads import head_count_updates
from graphprune.surgery.hf import update_config
from graphprune.surgery.sizes import Sizer, attribute_updates, graph_constant_changes
from graphprune.surgery.slicing import apply_attr_updates, module_updates, set_tensor, slice_tensors

# the verification of a compact model: check(model, analysis, plan); raises VerificationError
Check = Callable[[nn.Module, Analysis, Plan], None]


class Realized(NamedTuple):
    """A compact model, the plan that describes it, and the analysis that plan refers to."""

    model: nn.Module
    plan: Plan
    analysis: Analysis


class Engine:
    """Analyse ``model`` once; then plan and realise any number of times.

    ::

        engine = Engine(model, x, importance="l2")
        for r in (0.2, 0.4):
            small, plan, _ = engine.realize(engine.plan(r))

    The analysis works on its own copy of the model; ``realize`` slices a further copy unless
    ``last=True`` (cheaper for a one-shot compact: the engine can then not realise again).
    Neither the user's model nor a plan passed in is ever modified.
    """

    @keeps_global_rng
    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        importance: str | Criterion = "l2",
        ignored_layers: Any = (),
        structure: StructureOptions | None = None,
        data: Any = None,
        loss_fn: Any = None,
        reconstruct: ReconstructOptions | None = None,
        progress: bool = False,
    ) -> None:
        # reconstruction: layers without a bias get a zero one before analysis (bias compensation)
        self.reconstruct, self.data, self.progress = reconstruct, data, progress
        model, self.added_biases = recon.prepare_model(model) if reconstruct else (model, [])
        self.model = model
        self.example_input = example_input
        self.ignored_layers = ignored_layers
        self.structure = structure if structure is not None else StructureOptions()
        self.importance = importance_name(importance)
        self.analysis, self.criterion = prepare(
            model, example_input, importance, ignored_layers, data=data, loss_fn=loss_fn,
            **self.structure.as_kwargs(),
        )
        self._spent = False

    def plan(
        self, ratio: float, *, cut: CutOptions | None = None, counts: dict[int, int] | None = None
    ) -> Plan:
        """Which units go at ``ratio`` (``cut``: global ranking, per-module ratios, round_to)."""
        return build_plan(self.analysis, ratio, self.criterion, self.importance, counts=counts, options=cut)

    @keeps_global_rng
    def realize(
        self,
        plan: Plan,
        *,
        fallback: str = "freeze",
        cut: CutOptions | None = None,
        replan: bool = True,
        last: bool = False,
        verify: bool = False,
    ) -> Realized:
        """Surgery for ``plan`` with the ``fallback``; ``plan`` itself is left as it was.

        ``verify=True`` returns a verified model (what ``Engine.verify`` checks), and the
        verification's run of the compact model is also the check that it runs at the new sizes:
        one forward of the compact model fewer than ``realize`` then ``verify``.

        With ``fallback="freeze"`` and ``replan=True`` the modules that cannot run smaller are
        added to ``ignored_layers`` and the model re-analysed and re-planned at ``plan.ratio``
        with ``cut`` (what compact does); ``replan=False`` only drops their units from the plan
        (use it for plans made with ``counts``, which a re-plan at ``plan.ratio`` would not keep).
        """
        if self._spent:
            raise GraphPruneError("this Engine realised a plan with last=True; build a new Engine")
        own = _own(plan)
        analysis = self.analysis
        if self.reconstruct:  # refit a copy (unless last): it is also the verification's reference
            if not last:
                analysis = dataclasses.replace(analysis, model=private_copy(analysis.model))
            own = self._reconstructed(analysis, own, cut)

        def again(prefixes: list[str]) -> tuple[Analysis, Plan]:
            """The same plan with ``prefixes`` frozen, as if the user had listed them in ignored_layers
            (a fresh analysis of the untouched user model; the criterion's measurements are reused)."""
            ignored = [*_as_list(self.ignored_layers), *prefixes]
            structure = self.structure.as_kwargs()
            fresh = analyze(self.model, self.example_input, ignored_layers=ignored, **structure)
            again_plan = build_plan(fresh, own.ratio, self.criterion, self.importance, options=cut)
            return fresh, self._reconstructed(fresh, again_plan, cut)

        self._spent = last
        original = analysis.model if self.reconstruct else self.model
        return Realized(*realize_full(
            analysis, own, self.example_input, copy_model=not last or bool(self.reconstruct),
            fallback=fallback, replan=again if replan else None, original=original,
            check=self._checker(original) if verify else None,
        ))

    def _checker(self, original: nn.Module) -> Check:
        """The verification of a compact model, as ``verify`` runs it (``original``: the truth)."""
        from graphprune.verify import verify_compact

        def check(small: nn.Module, analysis: Analysis, plan: Plan) -> None:
            verify_compact(analysis, plan, small, self.example_input, original=original)

        return check

    def _reconstructed(self, analysis: Analysis, plan: Plan, cut: CutOptions | None) -> Plan:
        """With reconstruction: refit ``analysis.model`` in place and return the plan it matches."""
        if not self.reconstruct:
            return plan
        return recon.reconstructed_plan(
            analysis, plan, self.data, self.reconstruct, cut, progress=self.progress
        )


    @keeps_global_rng
    def verify(self, result: Realized) -> None:
        """Check ``result.model`` against the masked reference of ``result.plan`` (raises if off)."""
        # reconstructed: the refit full-size weights (the analysis' model, never sliced) are the truth
        original = result.analysis.model if self.reconstruct else self.model
        self._checker(original)(result.model, result.analysis, result.plan)

    def finish(self, result: Realized) -> None:
        """After verifying: take the zero biases reconstruction did not need out of the model."""
        if self.reconstruct:
            recon.finish(result.model, result.plan, self.added_biases)


def _own(plan: Plan) -> Plan:
    """A copy of ``plan`` that surgery may fill in (shapes, notes, attribute updates) without
    touching the caller's; the kept-index lists are shared (nothing modifies them), which keeps
    this cheap for plans of billion-parameter models where a deep copy takes seconds."""
    return dataclasses.replace(
        plan,
        slices={name: dict(dims) for name, dims in plan.slices.items()},
        shapes=dict(plan.shapes),
        groups=[dataclasses.replace(g, removed=list(g.removed)) for g in plan.groups],
        attr_updates=list(plan.attr_updates),
        boundaries=list(plan.boundaries),
        notes=list(plan.notes),
        structure=dict(plan.structure),
        scales=[dict(s) for s in plan.scales],
        rewrites=list(plan.rewrites),
    )


def _as_list(ignored: Any) -> list[Any]:
    if ignored is None:
        return []
    if isinstance(ignored, (str, nn.Module)):
        return [ignored]
    return list(ignored)


def importance_name(importance: str | Criterion) -> str:
    """The name a plan records for ``importance`` (a registry name, or the callable's name)."""
    if isinstance(importance, str):
        return importance
    return getattr(importance, "name", None) or getattr(importance, "__name__", "custom")


def prepare(
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
    with together("checking the arguments"):  # a rank that fails here must not leave the others waiting
        check_model(model)  # ``attention`` is checked by StructureOptions / analyze, once each
        criterion = resolve(importance, data=data, loss_fn=loss_fn, check_data=True)
        normalize_inputs(example_input)
    check_same("planning", model=model, example_input=example_input)
    analysis = analyze(model, example_input, ignored_layers=ignored_layers, **structure)
    prepare_criterion(criterion, analysis.model, data, loss_fn)
    return analysis, criterion


def realize(
    analysis: Analysis, plan: Plan, example_input: Any, *, copy_model: bool = False, fallback: str = "freeze"
) -> tuple[nn.Module, Plan]:
    """Surgery for ``plan``: on ``analysis.model`` itself, or on a copy when more plans will follow.

    ``copy_model=True`` leaves the analysis reusable (its weights unsliced), which is what a search
    over ratios needs: analyse once, then build and realise a plan per candidate. Returns the model
    and the plan that describes it: ``plan`` itself is never changed (a copy gets the shapes and
    attribute updates); when modules had to be kept whole (``fallback="freeze"``) the returned plan
    has their units dropped. Callers without a re-plan (the target search, Pruner, sensitivity) cut
    each group on its own, for which dropping the frozen units is the same as re-planning.
    """
    own = _own(plan)
    small, new_plan, _ = realize_full(analysis, own, example_input, copy_model=copy_model, fallback=fallback)
    return small, new_plan


def realize_full(
    analysis: Analysis,
    plan: Plan,
    example_input: Any,
    *,
    copy_model: bool = False,
    fallback: str = "freeze",
    replan: Replan | None = None,
    original: nn.Module | None = None,
    check: Check | None = None,
) -> tuple[nn.Module, Plan, Analysis]:
    """Surgery, then the ``fallback`` if the user's class cannot run: (model, plan, analysis).

    ``check(model, analysis, plan)`` (the verification; raises ``VerificationError``) is passed
    by callers that verify the result: the model returned has passed it, and on the first
    surgery its run of the compact model is also the check that the model runs (no separate run).

    ``replan(prefixes)`` returns a fresh (analysis, plan) with those modules frozen and every
    other option as before; without it the plan is restricted (``fallback.restrict_plan``),
    which needs the analysis' weights unsliced, so the surgery then works on a copy.
    ``original`` (the unsliced model the plan's reference uses; the analysis' own model when
    the surgery works on a copy) lets the freeze fallback first try rewriting the failing
    submodules as graphs (``surgery.rewrite_fallback``), kept only if verified.
    """
    fallback = check_fallback(fallback)
    if fallback in ("freeze", "whole") and replan is None:
        copy_model = True
    if original is None and copy_model:
        original = analysis.model
    small, plan, analysis, checked = _realize_full(
        analysis, plan, example_input, copy_model, fallback, replan, original, check
    )
    unshare(small, analysis.user_storages)  # the result never shares the user's memory
    if check is not None and not checked:  # a fallback's model: verified as it is returned
        check(small, analysis, plan)
    return small, plan, analysis


def _checked_run(work: nn.Module, analysis: Analysis, plan: Plan, example_input: Any,
                 check: Check) -> Failure | None:
    """``check`` (the verification) as the run that tells whether ``work`` runs at the new sizes:
    None if it passed; the Failure (what failed, where) if the model does not run or gives other
    output shapes; a numeric mismatch is raised as it is. Only after a failed check is the model
    run again plainly, to tell these apart and locate the failure."""
    try:
        check(work, analysis, plan)
    except VerificationError:
        failure = find_failure(work, example_input, analysis.traced.output_shapes)
        if failure is None:
            raise
        return failure
    return None


def _realize_full(analysis, plan, example_input, copy_model, fallback, replan, original, check):
    """(model, plan, analysis, whether ``check`` passed on that model)."""
    work, changes, failure = _surgery(analysis, plan, example_input, copy_model, check_runs=check is None)
    if failure is None and check is not None:
        failure = _checked_run(work, analysis, plan, example_input, check)
        if failure is None:
            return _finish(work, plan, example_input), plan, analysis, True
    if failure is None:
        return _finish(work, plan, example_input), plan, analysis, False
    model_cls = type(work).__name__
    if fallback == "error":
        path = culprit(work, failure.stack, set())
        raise GraphPruneError(error_message(model_cls, failure, path, work))
    why_not = ""
    if fallback in ("freeze", "whole"):
        done = "fallback='whole' asks for no rewrite" if fallback == "whole" else "no model to verify against"
        if original is not None and fallback == "freeze":
            done = _rewrite(analysis, plan, changes, work, example_input, failure, original)
        if not isinstance(done, str):
            return done, plan, analysis, False
        got = _freeze(analysis, plan, example_input, work, failure, copy_model, replan)
        if not isinstance(got, str):
            got[1].notes.append(f"not rewritten as graphs: {done}")
            return (*got, False)
        why_not = got
    gm = graph_fallback(analysis, plan, changes, work, example_input, failure, why_not_freeze=why_not)
    return gm, plan, analysis, False


def realize_inplace(model: nn.Module, analysis: Analysis, plan: Plan, example_input: Any, verify: bool):
    """Surgery on the analysis' copy (which shares ``model``'s memory) handing each new tensor to
    ``model`` at once, so the old one is freed: memory never holds the model twice. The reference
    is computed before slicing. No fallback: the original is gone once slicing starts."""
    from graphprune.verify import verify_compact

    hand_over = lambda name, new: set_tensor(model, name, new)  # noqa: E731
    # with ``verify`` the verification's run of the compact model is also the check that it
    # runs (one forward of the compact model instead of two); a failure is then located as before
    work, _, failure = _surgery(analysis, plan, example_input, False, hand_over, need_reference=verify,
                                check_runs=not verify)
    _refuse_inplace(work, failure)
    apply_attr_updates(model, plan.attr_updates)
    _finish(work, plan, example_input)
    if getattr(work, "config", None) is not None and getattr(model, "config", None) is not None:
        model.config.__dict__.update(work.config.__dict__)  # the object submodules hold
    if verify:
        try:
            verify_compact(analysis, plan, model, example_input)
        except VerificationError:
            _refuse_inplace(work, find_failure(model, example_input, analysis.traced.output_shapes))
            raise
    return model


def _refuse_inplace(work: nn.Module, failure: Failure | None) -> None:
    """compact(inplace=True) has no fallback: a model that does not run at the new sizes is an error."""
    if failure is not None:
        raise GraphPruneError(
            f"compact(inplace=True): {type(work).__name__} does not run at the new sizes "
            f"({failure.problem}); its weights were already replaced, so the model passed in is no "
            "longer usable. Rebuild it and call compact without inplace=True (it keeps such modules "
            "whole), or pass fallback='error' first to see which module fails."
        )


def _surgery(
    analysis: Analysis, plan: Plan, example_input: Any, copy_model: bool, on_slice=None, need_reference=False,
    check_runs: bool = True,
):
    """Slice, update attributes, run: (model, graph constant changes, Failure or None).

    ``check_runs=False`` skips the final run (the caller runs the compact model anyway: Failure
    None then means "not checked").

    The copy shares the analysis' weights (``shared_copy``): slicing makes new tensors, so the
    analysis stays unsliced without holding the model twice. The plan's reference, when one is
    computed (ambiguous attributes, or ``need_reference``), is kept on the plan for verify.
    """
    work = shared_copy(analysis.model) if copy_model else analysis.model
    plan.shapes = {name: list(param_tensor(work, name).shape) for name in plan.slices}
    removed = plan.removed_class
    sizer = Sizer(analysis, removed)
    changes = graph_constant_changes(analysis, sizer)
    attr_ups, notes = attribute_updates(analysis, changes, work)
    heads = head_count_updates(analysis, sizer, work, attr_ups)
    settled = {(u.module, u.attr) for u in heads}
    attr_ups = [u for u in attr_ups if (u.module, u.attr) not in settled] + heads
    plan.notes.extend(notes)
    # ambiguous attribute choices are judged by the plan's reference outputs (computed on the
    # unsliced weights), not by shapes alone: num_heads == head_dim == 2 runs either way
    reference = reference_if_ambiguous(analysis, removed, work, attr_ups, example_input, need_reference)
    plan._reference = None if reference is None else (np.array(removed, copy=True), reference)
    slice_tensors(work, plan, on_slice)
    mod_ups = module_updates(work)
    apply_attr_updates(work, mod_ups)
    attr_ups, ran = choose_attr_updates(
        work, attr_ups, example_input, analysis.traced.output_shapes, reference=reference
    )
    plan.attr_updates = mod_ups + attr_ups
    if ran or not check_runs:  # the choice already ran the model as it now is, with the expected shapes
        return work, changes, None
    return work, changes, find_failure(work, example_input, analysis.traced.output_shapes)


def _finish(small: nn.Module, plan: Plan, example_input: Any) -> nn.Module:
    """Hugging Face: model.config describes the new widths where it can."""
    plan.notes.extend(update_config(small, plan, example_input))
    return small


def _rewrite(analysis, plan, changes, work, example_input, failure: Failure, original: nn.Module):
    """Rewrite the failing submodules as graphs of their own (exact, verified): the model, or why not."""
    from graphprune.reference.run import compute_reference
    from graphprune.surgery.rewrite_fallback import try_rewrite
    from graphprune.verify import verify_compact

    def check(small: nn.Module) -> str | None:
        removed = plan.removed_class
        try:
            on_meta = any(p.is_meta for p in original.parameters())
            if getattr(plan, "_reference", None) is None and not on_meta:
                plan._reference = (np.array(removed, copy=True),
                                   compute_reference(analysis, removed, original, example_input))
            verify_compact(analysis, plan, small, example_input, original=original)
        except Exception as exc:  # noqa: BLE001 - VerificationError or a crash: not exact, keep them whole
            return f"the rewritten model does not pass verification ({str(exc).splitlines()[0][:200]})"
        return None

    got = try_rewrite(analysis, plan, changes, work, example_input, failure, check)
    if isinstance(got, str):
        return got
    plan.rewrites = got.records
    more = lambda paths: f" and {len(paths) - 6} more" if len(paths) > 6 else ""  # noqa: E731
    shown = "; ".join(f"{cls} ({', '.join(paths[:6])}{more(paths)})"
                      for cls, paths in got.classes.items())
    warn_user(
        f"graphprune: the compact model of class {type(work).__name__} cannot run at the new sizes "
        f"({failure.problem}), so these modules were rewritten as graphs of their own (same parameter "
        f"names, everything pruned, verified against the reference) and the rest kept as your code: "
        f"{shown}. To keep your own code there, {FIX}; or list them in ignored_layers."
    )
    plan.notes.append(f"rewritten as graphs so that {type(work).__name__} runs at the new sizes: {shown}")
    return _finish(work, plan, example_input)


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
            warn_user(freeze_warning(type(work).__name__, frozen))
            new_plan.notes.append(f"kept whole so that {type(work).__name__} runs at the new sizes: "
                                  f"{describe(frozen)}")
            return _finish(work, new_plan, example_input), new_plan, new_analysis
    return f"still failing after keeping {describe(frozen)} whole: {failure.problem}"


def modes(model: Any) -> dict[str, bool] | bool:
    """Train/eval flag of every submodule (a train-mode model may hold frozen, eval-mode BNs)."""
    if not isinstance(model, nn.Module):
        return False
    return {name: m.training for name, m in model.named_modules()}


def set_mode(model: nn.Module, training: bool | dict[str, bool]) -> None:
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
