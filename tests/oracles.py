"""Oracles shared by the engine tests: every check compares against something independent.

A pruning engine is easy to "test" by eye and hard to test for real, because a compact model
that runs and has the right output shape can still be numerically wrong. Each helper here checks
the engine against a reference it cannot influence:

* ``check_ratio_zero_identity``: removing nothing must give bit-identical outputs.
* ``check_dead_channels``: channels made exactly dead (every parameter slice that touches them
  zeroed) contribute nothing, so removing exactly them must not change the outputs.
* ``check_onnx``: onnxruntime, run here independently of graphprune's own check, must agree with
  the compact torch model.
* ``check_input_untouched``: the user's model is bit-identical after compaction.

``OracleSuite`` runs all of them, as tests, on every model of a family: a test file subclasses it
once and states only its models and what it expects beyond the generic oracles.

"Relative" error throughout means ``max|a - b| / max|b|`` over each output tensor: one number per
tensor, insensitive to individual near-zero elements, which is what a user means by "the same
outputs up to 1e-5".
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import graphprune
from graphprune.graph.inputs import flatten_outputs, normalize_inputs, run_model

# ------------------------------------------------------------------------------------------
# Output comparison
# ------------------------------------------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (absolute error when ``expected`` is all 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare_outputs(
    actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, what: str
) -> None:
    """Assert two flat output lists have the same structure, shapes and values within ``rtol``."""
    assert len(actual) == len(expected), (
        f"{what}: {len(actual)} output tensors, expected {len(expected)}"
    )
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert tuple(a.shape) == tuple(e.shape), (
            f"{what}: output {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        )
        if rtol == 0:
            assert torch.equal(a, e), (
                f"{what}: output {i} is not bit-identical "
                f"(relative error {relative_error(a, e):.3g})"
            )
        else:
            err = relative_error(a, e)
            assert err <= rtol, f"{what}: output {i} differs, relative error {err:.3g} > {rtol:g}"


def assert_same_outputs(
    a: nn.Module, b: nn.Module, example_input: Any, rtol: float, what: str = "outputs"
) -> None:
    """Run both models on ``example_input`` and compare every output tensor (``b`` is the reference).

    ``rtol=0`` demands bit-identical outputs.
    """
    out_a = flatten_outputs(run_model(a, example_input))
    out_b = flatten_outputs(run_model(b, example_input))
    compare_outputs(out_a, out_b, rtol, what)


# ------------------------------------------------------------------------------------------
# The user's model must not change
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything about a module that compaction must leave alone."""

    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    text: str
    training: bool


def snapshot(model: nn.Module) -> Snapshot:
    """Copy the model's state (cloned tensors), its ``repr`` (module attributes) and its mode."""
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
        text=repr(model),
        training=model.training,
    )


def assert_untouched(model: nn.Module, before: Snapshot) -> None:
    """Assert ``model`` is bit-identical to ``before`` (state_dict, attributes, mode, grad flags)."""
    after = model.state_dict()
    assert list(after) == list(before.state), (
        f"the input model's state_dict keys changed: "
        f"added {sorted(set(after) - set(before.state))}, "
        f"removed {sorted(set(before.state) - set(after))}"
    )
    for key, old in before.state.items():
        new = after[key]
        assert new.shape == old.shape, (
            f"the input model's {key} changed shape {tuple(old.shape)} -> {tuple(new.shape)}"
        )
        assert new.dtype == old.dtype and torch.equal(new, old), (
            f"the input model's {key} changed value"
        )
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before.requires_grad, (
        "requires_grad flags of the input model changed"
    )
    assert repr(model) == before.text, "the input model's modules/attributes changed (repr differs)"
    assert model.training == before.training, "the input model's train/eval mode changed"


def check_input_untouched(
    model: nn.Module, example_input: Any, ratio: float = 0.3, **kwargs: Any
) -> nn.Module:
    """Compact ``model`` and assert the input model is bit-identical afterwards; return the result."""
    before = snapshot(model)
    small = graphprune.compact(model, example_input, ratio=ratio, **kwargs)
    assert_untouched(model, before)
    return small


# ------------------------------------------------------------------------------------------
# ratio 0
# ------------------------------------------------------------------------------------------


def check_ratio_zero_identity(model: nn.Module, example_input: Any) -> nn.Module:
    """``compact(ratio=0)`` removes nothing, so outputs and parameter count must be identical."""
    small = graphprune.compact(model, example_input, ratio=0.0)
    assert_same_outputs(small, model, example_input, rtol=0.0, what="compact(ratio=0) vs original")
    assert graphprune.count_params(small) == graphprune.count_params(model), (
        f"compact(ratio=0) changed the parameter count: {graphprune.count_params(model)} -> "
        f"{graphprune.count_params(small)}"
    )
    return small


# ------------------------------------------------------------------------------------------
# Exactly dead channels
# ------------------------------------------------------------------------------------------


def _group_key(group: Any) -> frozenset[tuple[str, int]]:
    """Identify a group by its members, not its index, so a fresh analysis maps to the same key."""
    return frozenset((m.name, int(m.dim)) for m in group.members)


# compact's default ``round_to="auto"`` rounds the kept width of a group with convolution
# channels to the nearest multiple of its alignment (at most 16 units), so it may remove up to
# half a step, 8 units, more than ``ratio * units`` (graphprune.planning.cut). Such groups get
# that many more dead units; groups without convolutions are cut exactly and get none.
AUTO_SLACK = 8


def _dead_count(ratio: float, num_units: int, slack: int = 0) -> int:
    """How many units to kill in a group.

    ``ceil`` rather than ``round``: whatever rounding the engine uses to turn ``ratio`` into a count
    (floor, round or ceil), it then removes no more units than are dead, so every removed unit
    is a dead one; ``slack`` more cover rounding to aligned widths. Dead units it keeps are
    harmless (they still compute zeros). One unit is always left alive.
    """
    extra = slack if ratio > 0 else 0
    return max(0, min(math.ceil(ratio * num_units - 1e-9) + extra, num_units - 1))


def _has_conv_channels(group: Any, model: nn.Module) -> bool:
    """Whether a member of ``group`` is a convolution's weight (the groups "auto" rounds)."""
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        module = model.get_submodule(path) if path else model
        if attr == "weight" and isinstance(module, nn.modules.conv._ConvNd):
            return True
    return False


@dataclass
class DeadChannels:
    """What ``make_dead`` did: the modified model and, per group, the units it killed."""

    model: nn.Module
    dead: dict[frozenset[tuple[str, int]], np.ndarray]
    zeroed: int  # number of parameter slices zeroed (sanity: > 0 when anything is prunable)

    def importance(self, group: Any, model: nn.Module) -> torch.Tensor:
        """Score the dead units 0 and every other unit 1 (lower is removed first)."""
        scores = torch.ones(group.num_units)
        units = self.dead.get(_group_key(group))
        if units is not None and len(units):
            scores[torch.as_tensor(units, dtype=torch.long)] = 0.0
        return scores


def check_groups_consistent(analysis: Any, model: nn.Module) -> None:
    """The analysis honours its own contract (``Group``/``Member`` in the API docs).

    Every member names a parameter or buffer of the model and has one ``unit_of`` entry per
    position along its dim, entries in ``[-1, num_units)``; every unit of a prunable group owns
    at least one position of at least one *parameter* (a unit with no weights would be nothing to
    remove). Checked first so that a broken analysis fails with a message about the analysis,
    not as a mysterious output mismatch later.
    """
    params = dict(model.named_parameters())
    tensors = {**dict(model.named_buffers()), **params}
    for group in analysis.groups:
        owned = np.zeros(max(group.num_units, 0), dtype=bool)
        for m in group.members:
            assert m.name in tensors, (
                f"group {group.index}: member {m.name!r} is neither a parameter nor a buffer"
            )
            unit_of = np.asarray(m.unit_of)
            size = tensors[m.name].shape[m.dim]
            assert unit_of.shape == (size,), (
                f"group {group.index}: {m.name} has {size} positions along dim {m.dim} but "
                f"unit_of has shape {unit_of.shape}"
            )
            assert unit_of.min(initial=-1) >= -1 and unit_of.max(initial=-1) < group.num_units, (
                f"group {group.index}: {m.name}[dim {m.dim}] refers to units outside "
                f"[-1, {group.num_units}): {sorted(set(unit_of.tolist()))}"
            )
            if m.name in params:
                owned[unit_of[unit_of >= 0]] = True
        if group.prunable:
            missing = np.nonzero(~owned)[0].tolist()
            assert not missing, (
                f"group {group.index} ({group.num_units} units): units {missing[:10]} own no "
                f"parameter position in any member {[repr(m) for m in group.members][:6]}"
            )


def make_dead(
    model: nn.Module,
    example_input: Any,
    ratio: float,
    seed: int = 0,
    slack: int = AUTO_SLACK,
    **structure: Any,
) -> DeadChannels:
    """Copy ``model`` and make ``ceil(ratio * num_units)`` units of every prunable group exactly dead
    (``slack`` more in groups with convolution channels, for ``round_to="auto"``; 0 for exact cuts).

    Every member slice of a dead unit that is a *parameter* is zeroed: producer weights and biases,
    norm scale and shift, consumer input weights. BN running statistics are left alone on
    purpose: with zero scale and shift a BN channel outputs exactly 0 whatever its statistics, and
    keeping them non-trivial checks that the engine slices them consistently. ``structure``
    (``prune_hidden``, ``attention``) is passed to ``analyze``: it decides what a unit is.
    """
    dead_model = copy.deepcopy(model)
    analysis = graphprune.analyze(dead_model, example_input, **structure)
    check_groups_consistent(analysis, dead_model)
    params = dict(dead_model.named_parameters())
    rng = np.random.default_rng(seed)
    dead: dict[frozenset[tuple[str, int]], np.ndarray] = {}
    zeroed = 0
    with torch.no_grad():
        for group in analysis.groups:
            if not group.prunable:
                continue
            k = _dead_count(ratio, group.num_units, slack if _has_conv_channels(group, dead_model) else 0)
            units = np.sort(rng.choice(group.num_units, size=k, replace=False)) if k else np.array([], int)
            dead[_group_key(group)] = units
            if not k:
                continue
            for member in group.members:
                if member.name not in params:
                    continue  # buffers (BN running stats) stay as they are
                tensor = params[member.name]
                unit_of = np.asarray(member.unit_of)
                positions = np.nonzero(np.isin(unit_of, units))[0]
                if len(positions):
                    tensor.index_fill_(member.dim, torch.as_tensor(positions, dtype=torch.long), 0.0)
                    zeroed += 1
    return DeadChannels(dead_model, dead, zeroed)


def assert_finite_reference(model: nn.Module, example_input: Any) -> None:
    """A reference whose outputs hold NaN/Inf proves nothing: NaN compares unequal to everything,
    and whether a kernel propagates it (0 * NaN) varies between builds. Refuse to use it."""
    for i, out in enumerate(flatten_outputs(run_model(model, example_input))):
        if out.is_floating_point() and not torch.isfinite(out).all():
            raise AssertionError(
                f"degenerate oracle: the dead-unit reference's output {i} holds NaN/Inf (a dead unit "
                "feeds an op that is undefined at zero, e.g. x / x.norm()); pick a model whose dead "
                "units are well defined"
            )


def check_dead_channels(
    model: nn.Module,
    example_input: Any,
    ratio: float,
    rtol: float = 1e-5,
    round_to: int | str = "auto",
    **structure: Any,
) -> nn.Module:
    """Kill ``ratio`` of every prunable group, compact exactly those units away, compare outputs.

    The compact model must match the dead model (not the original: killing units changes it)
    within ``rtol`` and have fewer parameters. ``round_to`` is compact's (the default "auto", or
    1 for exact counts, which kills no extra units). Returns the compact model.
    """
    slack = 0 if round_to == 1 else AUTO_SLACK
    dead = make_dead(model, example_input, ratio, slack=slack, **structure)
    assert dead.dead, "analyze() found no prunable group, so the dead-channel check tests nothing"
    assert dead.zeroed > 0, "no parameter slice was zeroed: every prunable group has < 2 units?"
    assert_finite_reference(dead.model, example_input)
    small = graphprune.compact(
        dead.model, example_input, ratio=ratio, importance=dead.importance, round_to=round_to, **structure
    )
    assert_same_outputs(
        small, dead.model, example_input, rtol=rtol,
        what=f"compact(ratio={ratio}) of exactly dead channels vs the dead model",
    )
    before, after = graphprune.count_params(dead.model), graphprune.count_params(small)
    assert after < before, f"removing dead channels did not reduce parameters ({before} -> {after})"
    return small


# ------------------------------------------------------------------------------------------
# Shapes, parameters, FLOPs
# ------------------------------------------------------------------------------------------


def check_shape_params_flops(
    model: nn.Module, small: nn.Module, example_input: Any, flops: bool = True
) -> None:
    """The compact model keeps every output shape and has fewer parameters and (``flops``) FLOPs."""
    outs = flatten_outputs(run_model(model, example_input))
    small_outs = flatten_outputs(run_model(small, example_input))
    assert [tuple(t.shape) for t in small_outs] == [tuple(t.shape) for t in outs], (
        f"output shapes changed: {[tuple(t.shape) for t in outs]} -> "
        f"{[tuple(t.shape) for t in small_outs]}"
    )
    p0, p1 = graphprune.count_params(model), graphprune.count_params(small)
    assert p1 < p0, f"parameters did not go down: {p0} -> {p1}"
    if not flops:
        return
    f0 = graphprune.count_flops(model, example_input)
    f1 = graphprune.count_flops(small, example_input)
    assert f1 < f0, f"FLOPs did not go down: {f0} -> {f1}"


# ------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------


def _ort_feeds(session: Any, example_input: Any) -> dict[str, np.ndarray]:
    """Map the example input onto the ONNX graph inputs: by name for dict inputs, else in order."""
    args, kwargs = normalize_inputs(example_input)
    names = [i.name for i in session.get_inputs()]
    if kwargs and all(n in kwargs for n in names):
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    assert len(names) == len(tensors), (
        f"the ONNX graph has inputs {names} but the example input has {len(tensors)} tensors"
    )
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def check_onnx(
    small: nn.Module, example_input: Any, rtol: float = 1e-4, path: str | Path | None = None
) -> Any:
    """Export with graphprune (its own check on), then check the file independently.

    The file must pass ``onnx.checker`` and onnxruntime's outputs must match the torch model's
    within ``rtol``. Returns graphprune's ExportResult.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(path) if path is not None else Path(tmp) / "small.onnx"
        result = graphprune.export_onnx(small, example_input, target, check=True, rtol=rtol)
        assert target.is_file(), f"export_onnx did not write {target}"
        onnx.checker.check_model(str(target))
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        ort_outs = session.run(None, _ort_feeds(session, example_input))
    expected = flatten_outputs(run_model(small, example_input))
    compare_outputs([torch.from_numpy(np.asarray(o)) for o in ort_outs], expected, rtol,
                    "onnxruntime vs torch (compact model)")
    return result


# ------------------------------------------------------------------------------------------
# One compaction per model, shared by every test that looks at it
# ------------------------------------------------------------------------------------------

Builder = Callable[[str], tuple[nn.Module, Any]]


@dataclass
class Compacted:
    """A model, its example input, a snapshot taken before compaction, and what compact returned."""

    name: str
    ratio: float
    model: nn.Module
    example_input: Any
    before: Snapshot
    small: nn.Module
    plan: graphprune.Plan
    warnings: list[str]  # graphprune's own warnings while compacting (e.g. the graph fallback)


_COMPACTED: dict[tuple[Builder, str, float], Compacted | BaseException] = {}


def compacted(build: Builder, name: str, ratio: float) -> Compacted:
    """``build(name)`` compacted at ``ratio`` (``compact_with_plan``, verification on), once per session.

    Compacting (tracing, planning, surgery, verification) is the slow part of every test, and
    several oracles look at the same compact model, so each (builder, name, ratio) is compacted
    once and the result handed out again. A failure is cached too and re-raised for every test
    that asks, so a broken model costs one compaction, not one per oracle.
    """
    key = (build, name, ratio)
    if key not in _COMPACTED:
        model, x = build(name)
        before = snapshot(model)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                small, plan = graphprune.compact_with_plan(model, x, ratio=ratio)
            msgs = [str(w.message) for w in caught if str(w.message).startswith("graphprune")]
            _COMPACTED[key] = Compacted(name, ratio, model, x, before, small, plan, msgs)
        except Exception as e:  # noqa: BLE001 - re-raised below, for every test that asks
            _COMPACTED[key] = e
    hit = _COMPACTED[key]
    if isinstance(hit, BaseException):
        raise hit
    return hit


# ------------------------------------------------------------------------------------------
# Every oracle above, as tests over a family of models
# ------------------------------------------------------------------------------------------


class OracleSuite:
    """The generic oracles as a test class; a test file subclasses it once for its models::

        @pytest.mark.parametrize("name", MODELS)
        class TestGenericOracles(OracleSuite):
            build = zoo.build     # name -> (model in eval mode, example input)

    Every test below then runs on every model: ratio 0 is bit-identical, exactly dead units are
    removed without changing the outputs, the input model is untouched, output shapes stay while
    parameters (and, with ``flops``, FLOPs) go down, the result is the user's class, and
    onnxruntime agrees with it. A subclass may override a test to expect something else for some
    models (calling ``super()`` for the rest). This class itself is not collected: its name does
    not start with ``Test``.
    """

    build: ClassVar[Builder]  # read as type(self).build: a plain function needs no staticmethod
    ratio: ClassVar[float] = 0.3
    flops: ClassVar[bool] = True

    def compacted(self, name: str) -> Compacted:
        """The model ``name`` compacted at ``self.ratio``, shared with every other test."""
        return compacted(type(self).build, name, self.ratio)

    def test_ratio_zero_gives_bit_identical_outputs(self, name: str) -> None:
        check_ratio_zero_identity(*type(self).build(name))

    def test_removing_exactly_dead_units_leaves_outputs_unchanged(self, name: str) -> None:
        check_dead_channels(*type(self).build(name), self.ratio)

    def test_input_model_is_bit_identical_after_compact(self, name: str) -> None:
        c = self.compacted(name)
        assert_untouched(c.model, c.before)

    def test_compact_keeps_output_shapes_and_cuts_params(self, name: str) -> None:
        c = self.compacted(name)
        check_shape_params_flops(c.model, c.small, c.example_input, flops=self.flops)

    def test_compact_model_is_the_users_class(self, name: str) -> None:
        c = self.compacted(name)
        assert type(c.small) is type(c.model), (
            f"compact returned {type(c.small).__name__}, expected the user's "
            f"{type(c.model).__name__}; graphprune warnings: {c.warnings}"
        )

    def test_onnx_export_matches_compact_model_in_onnxruntime(self, name: str) -> None:
        c = self.compacted(name)
        check_onnx(c.small, c.example_input)
