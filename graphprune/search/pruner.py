"""Iterative pruning: remove units a little at a time, with fine-tuning in between.

One-shot removal of half the channels can wreck a network that a few gentler steps with
recovery in between would have kept accurate. :class:`Pruner` spreads a target ratio over
``steps`` calls to :meth:`Pruner.step` along a schedule:

* ``"linear"``: after step k of n, ``target * k / n`` of every group's *original* units are gone;
* ``"cubic"`` (gradual magnitude pruning, Zhu & Gupta 2017): ``target * (1 - (1 - k/n)^3)`` -
  large steps while the network has redundancy to spare, small ones near the end;
* or any callable ``(k, n) -> fraction of the target reached``.

Counts are computed from the original unit counts, not compounded per step, so rounding never
drifts: the final model has exactly the widths a one-shot ``compact`` at ``target`` would have.

Two modes:

* physical (default): every step is a real ``compact`` - the model shrinks, so fine-tuning
  between steps is cheaper as it goes;
* ``soft=True`` (soft filter pruning, He et al. 2018): units are *zeroed*, shapes kept; zeroed
  units may regrow during fine-tuning and every step re-selects among all units; the last step
  removes the final selection physically.

Data-driven criteria (Taylor, Hessian, activations) **accumulate** across steps by default: step
k's score is the sum of the measurements of steps 1..k, each taken on the model as it was then.
After a physical shrink the stored measurements are sliced with the step's plan, so they stay
aligned with the surviving units (Torch-Pruning's Hessian accumulator is keyed inconsistently
and keeps only the last sample; ``tests/test_importance.py`` checks ours against sums by hand).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.engine import importance_name, prepare, realize, set_mode
from graphprune.errors import InputError
from graphprune.graph.analysis import Analysis, Group, analyze, param_tensor
from graphprune.graph.copies import eval_copy, keeps_global_rng, private_copy
from graphprune.graph.trace import check_model
from graphprune.planning.cut import (
    CutOptions,
    alignment,
    global_counts,
    output_modules,
    ratio_of,
    round_keep,
)
from graphprune.planning.importance import Criterion, Importance, prepare_criterion, resolve, scores_for
from graphprune.planning.plan import Plan, build_plan, check_ratio
from graphprune.reconstruct import hook as recon

Schedule = Callable[[int, int], float]


def linear_schedule(k: int, n: int) -> float:
    return k / n


def cubic_schedule(k: int, n: int) -> float:
    return 1.0 - (1.0 - k / n) ** 3


SCHEDULES: dict[str, Schedule] = {"linear": linear_schedule, "cubic": cubic_schedule}


def _signature(group: Group) -> tuple[tuple[str, int], ...]:
    """Identify a group across re-analyses of a shrinking model (indices may not be stable).

    Biases are left out: ``reconstruct`` gives bias-free layers one, which must not make the
    group a stranger to the next step.
    """
    named = [(m.name, m.dim) for m in group.members if m.name.rpartition(".")[2] != "bias"]
    return tuple(sorted(named or [(m.name, m.dim) for m in group.members]))


@dataclass
class StepRecord:
    step: int
    fraction: float  # of the original units removed (overall target times the schedule)
    units: dict[str, int]  # group description -> units kept
    params: int
    plan: Plan | None


class _MaskScores:
    """Criterion scoring 0 for masked units and 1 for kept ones (the soft mode's final removal)."""

    name = "soft-mask"

    def __init__(self, masks: dict[tuple[tuple[str, int], ...], np.ndarray]) -> None:
        self.masks = masks

    def __call__(self, group: Group, model: nn.Module) -> np.ndarray:
        mask = self.masks.get(_signature(group))
        if mask is None or mask.shape[0] != group.num_units:
            return np.ones(group.num_units)
        return np.where(mask, 0.0, 1.0)


class Pruner:
    """Prune ``model`` to ``target_ratio`` in ``steps`` calls of :meth:`step`.

    ``model`` itself is never modified: the pruner works on a copy, available as
    :attr:`model` (the current, possibly shrunk, model). ``finetune(model)`` runs after every
    step (train the model in place, or return a new one). Other keywords are those of
    :func:`graphprune.compact`, except that ``round_to`` defaults to exact widths here (every
    step's count follows the schedule); pass ``round_to="auto"`` for aligned widths. Example::

        pruner = graphprune.Pruner(model, x, target_ratio=0.5, steps=5, schedule="cubic",
                                   importance="taylor", data=calib, loss_fn=F.cross_entropy,
                                   finetune=lambda m: train(m, epochs=1))
        small = pruner.run()          # or: for _ in range(5): pruner.step()

    ``reconstruct=True`` (with ``data``) refits every physical step by least squares
    (graphprune.reconstruct); in soft mode the final removal keeps the soft selection and refits.
    """

    @keeps_global_rng
    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        target_ratio: float = 0.5,
        steps: int = 5,
        *,
        schedule: str | Schedule = "linear",
        importance: str | Criterion = "l2",
        data: Any = None,
        loss_fn: Any = None,
        finetune: Callable[[nn.Module], Any] | None = None,
        soft: bool = False,
        accumulate: bool = True,
        ignored_layers: Any = (),
        prune_hidden: bool = False,
        attention: str = "heads",
        global_pruning: bool = False,
        max_ratio: float | None = None,
        ratios: dict[str | int, float] | None = None,
        round_to: int | str | None = None,
        verify: bool = True,
        reconstruct: Any = False,
    ) -> None:
        check_model(model)
        self.target_ratio = check_ratio(target_ratio)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise InputError(
                    f"schedule must be one of {sorted(SCHEDULES)} or a callable (k, n) -> fraction"
                )
            schedule = SCHEDULES[schedule]
        if not callable(schedule):
            raise InputError(f"schedule must be a name or a callable (k, n) -> fraction, got {schedule!r}")
        if finetune is not None and not callable(finetune):
            raise InputError("finetune must be a callable taking the model (or None)")
        self.schedule: Schedule = schedule
        self.steps = steps
        self.example_input = example_input
        self.criterion = resolve(importance, data=data, loss_fn=loss_fn, check_data=True)
        if accumulate and isinstance(self.criterion, Importance):
            self.criterion.accumulate = True
        self.data, self.loss_fn = data, loss_fn
        self.reconstruct = recon.check_request(reconstruct, data, example_input)
        self.finetune = finetune
        self.soft = bool(soft)
        self.ignored_layers = ignored_layers
        self.structure = {"prune_hidden": prune_hidden, "attention": attention}
        self.options = CutOptions(bool(global_pruning), max_ratio, ratios, round_to)
        self.verify = verify
        self._training = model.training
        self.model: nn.Module = private_copy(model)
        self.step_count = 0
        self.history: list[StepRecord] = []
        self.plans: list[Plan] = []
        analysis = analyze(model, example_input, ignored_layers=ignored_layers, **self.structure)
        self._analysis = analysis  # soft mode keeps using it (shapes never change until the end)
        prunable = [g for g in analysis.groups if g.members and g.num_units > 1]
        self._units0 = {_signature(g): g.num_units for g in prunable}
        self._final: dict[tuple[tuple[str, int], ...], float | None] = {}
        for g in prunable:
            r = ratio_of(g, output_modules(g, analysis.model), ratios) if ratios else None
            self._final[_signature(g)] = r  # None: the overall target (or global pool)
        self._masks: dict[tuple[tuple[str, int], ...], np.ndarray] = {
            sig: np.zeros(u, dtype=bool) for sig, u in self._units0.items()
        }

    # ------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.step_count >= self.steps

    def fraction_at(self, k: int) -> float:
        """Fraction of the original units removed after step ``k`` (overall target x schedule)."""
        s = float(self.schedule(k, self.steps))
        if not 0.0 <= s <= 1.0 + 1e-9:
            raise InputError(f"schedule({k}, {self.steps}) returned {s}; it must lie in [0, 1]")
        return self.target_ratio * min(s, 1.0)

    def _counts(self, analysis: Analysis, model: nn.Module, k: int) -> dict[int, int]:
        """Units to remove from each group of ``analysis`` (the current model) at step ``k``."""
        s = self.fraction_at(k) / self.target_ratio if self.target_ratio > 0 else 0.0
        counts: dict[int, int] = {}
        pool: list[tuple[Group, int]] = []
        for g in analysis.groups:
            if not g.members or g.num_units < 1:
                continue
            sig = _signature(g)
            u0 = self._units0.get(sig, g.num_units)
            final = self._final.get(sig)
            if final is None and self.options.global_pruning:
                pool.append((g, u0))
                continue
            r = (self.target_ratio if final is None else final) * s
            keep = max(1, u0 - int(round(r * u0)))
            if keep < g.num_units:
                keep = round_keep(g, keep, alignment(g, analysis.model, self.options.round_to))
            counts[g.index] = max(0, g.num_units - keep)
        if pool:
            max_ratio = self.options.cap
            total0 = sum(u0 for _, u0 in pool)
            gone = sum(u0 - g.num_units for g, u0 in pool) if not self.soft else 0
            need = max(0, int(round(self.target_ratio * s * total0)) - gone)
            caps = {
                g.index: max(0, g.num_units - max(1, math.ceil((1 - max_ratio) * u0))) for g, u0 in pool
            }
            scores = {g.index: scores_for(self.criterion, g, model) for g, _ in pool}
            counts.update(global_counts(scores, need, caps))
        return counts

    def step(self) -> nn.Module:
        """Run the next step (prune, then fine-tune); return the current model."""
        if self.done:
            raise InputError(f"the pruner already ran all {self.steps} steps; its result is pruner.model")
        k = self.step_count + 1
        plan: Plan | None
        if self.soft and k < self.steps:
            plan = None
            self._soft_step(k)
        else:
            plan = self._physical_step(k)
            self.plans.append(plan)
        self.step_count = k
        if self.finetune is not None:
            out = self.finetune(self.model)
            if isinstance(out, nn.Module):
                self.model = out
        self.history.append(StepRecord(k, self.fraction_at(k), self._widths(), _count(self.model), plan))
        return self.model

    def run(self) -> nn.Module:
        """Run every remaining step; return the final model."""
        while not self.done:
            self.step()
        return self.model

    # ------------------------------------------------------------------------------------------
    @keeps_global_rng  # pruning leaves the RNG alone; the user's finetune draws from it as it likes
    def _physical_step(self, k: int) -> Plan:
        soft_final = self.soft
        criterion: Criterion = _MaskScores(self._masks) if soft_final else self.criterion
        if soft_final:
            self._soft_step(k)  # final selection on the masked model
        rec = self.reconstruct
        if rec is not None and soft_final:  # the soft selection stands: refit only
            rec = dataclasses.replace(rec, selection="plan")
        source, added = recon.prepare_model(self.model) if rec else (self.model, [])
        analysis, _ = prepare(
            source,
            self.example_input,
            criterion,
            self.ignored_layers,
            data=None if soft_final else self.data,
            loss_fn=self.loss_fn,
            **self.structure,
        )
        if soft_final:
            counts = {
                g.index: int(self._masks[_signature(g)].sum())
                for g in analysis.groups
                if _signature(g) in self._masks and self._masks[_signature(g)].shape[0] == g.num_units
            }
        else:
            counts = self._counts(analysis, analysis.model, k)
        name = importance_name(self.criterion)
        plan = build_plan(analysis, self.fraction_at(k), criterion, name, counts=counts)
        if rec:
            plan = recon.reconstructed_plan(analysis, plan, self.data, rec, None)
        mode = "soft, final removal" if soft_final else "physical"
        plan.notes.append(f"Pruner step {k}/{self.steps} ({mode})")
        small, plan = realize(analysis, plan, self.example_input, copy_model=bool(rec))
        if self.verify:
            from graphprune.verify import verify_compact

            original = analysis.model if rec else self.model
            verify_compact(analysis, plan, small, self.example_input, original=original)
        if rec:
            recon.finish(small, plan, added)
        if not soft_final and hasattr(self.criterion, "remap"):
            self.criterion.remap(plan)
        set_mode(small, self._training)
        self.model = small
        return plan

    @keeps_global_rng
    def _soft_step(self, k: int) -> None:
        """Select the lowest-scored units of every group on the current weights and zero them."""
        analysis = self._analysis
        measured = eval_copy(self.model)  # measuring must not touch BN statistics of the live model
        prepare_criterion(self.criterion, measured, self.data, self.loss_fn)
        counts = self._counts(analysis, measured, k)
        for g in analysis.groups:
            sig = _signature(g)
            if sig not in self._masks:
                continue
            mask = np.zeros(g.num_units, dtype=bool)
            n = counts.get(g.index, 0)
            if n > 0:
                order = np.argsort(scores_for(self.criterion, g, measured), kind="stable")
                mask[order[:n]] = True
            self._masks[sig] = mask
            zero_units(self.model, g, mask)

    def _widths(self) -> dict[str, int]:
        if self.soft and not self.done:
            return {
                g.describe(): int((~self._masks[_signature(g)]).sum())
                for g in self._analysis.groups
                if _signature(g) in self._masks
            }
        plan = self.plans[-1] if self.plans else None
        if plan is None:
            return {}
        return {gp.layers: gp.units - len(gp.removed) for gp in plan.groups if gp.units > 1}


def zero_units(model: nn.Module, group: Group, mask: np.ndarray) -> None:
    """Zero every parameter slice of the masked units (buffers such as running stats are kept)."""
    if not mask.any():
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for m in group.members:
            if m.name not in params:
                continue
            pos = np.flatnonzero((m.unit_of >= 0) & mask[np.maximum(m.unit_of, 0)])
            if pos.size:
                t = param_tensor(model, m.name)
                t.index_fill_(m.dim, torch.as_tensor(pos, dtype=torch.long, device=t.device), 0.0)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
