"""No public call changes the caller's model or inputs, whatever the model's forward does.

One hostile model does everything a forward can do to its own state and its input: an
``nn.Embedding(max_norm=...)`` renormalises the rows it looks up in place, ``conv.weight.clamp_()``
under ``no_grad``, ``x.mul_(0.5)`` on the input, a BatchNorm in train mode (running statistics),
a Python counter, a plain tensor attribute updated in place, a draw from the global RNG, hooks,
mixed train/eval flags and a frozen parameter. Every entry point of
``graphprune.__all__`` is run on it and must leave the model's parameters, buffers, flags, hooks
and plain attributes, the example input and torch's global RNG exactly as they were (issue 10).
A name added to ``__all__`` fails ``test_every_public_name_is_classified`` until it is covered
here or said not to take a model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import graphprune


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, max_norm=1.0)  # renorms looked-up rows of its weight in place
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.res = nn.Linear(8, 8)  # a residual branch: a block depth pruning may remove
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.calls = 0
        self.seen = torch.zeros(())  # a plain tensor attribute (neither parameter nor buffer)
        with torch.no_grad():
            self.emb.weight.mul_(5.0)  # rows well above max_norm: a renorm changes them

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.seen.add_(1)
        with torch.no_grad():
            self.conv.weight.clamp_(-0.1, 0.1)
        x.mul_(0.5)
        x = x + 0.0 * torch.rand_like(x)  # draws from torch's global generator on every run
        y = self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        if ids is not None:
            y = y + self.emb(ids).sum(1)
        y = y + self.res(torch.relu(y))
        return self.head(y)


def hostile() -> Hostile:
    torch.manual_seed(0)
    model = Hostile()
    model.conv2.register_forward_hook(lambda mod, args, out: None)
    model.head.register_forward_pre_hook(lambda mod, args: None)
    model.train()  # BatchNorm updates its running statistics in train mode
    model.head.eval()  # mixed flags: a restore with model.train(flag) would lose this
    model.bn.weight.requires_grad_(False)
    return model


FORMS = ("tensor", "tuple", "dict")


def example(form: str) -> Any:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=g)
    ids = torch.randint(0, 12, (2, 3), generator=g)
    return {"tensor": x, "tuple": (x, ids), "dict": {"x": x, "ids": ids}}[form]


def call(model: nn.Module, ex: Any) -> torch.Tensor:
    """The model on a copy of ``ex`` (what a user's own metric would do)."""
    ex = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ex)
    with torch.no_grad():
        if isinstance(ex, dict):
            return model(**ex)
        return model(*((ex,) if isinstance(ex, torch.Tensor) else ex))


# ------------------------------------------------------------------------------------------
# Before / after
# ------------------------------------------------------------------------------------------

_PLAIN = (int, float, str, bool, type(None))


def snapshot(model: nn.Module, ex: Any) -> dict[str, Any]:
    mods = dict(model.named_modules())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "tensors": {k: (t, t.detach().clone(), t.requires_grad, t.grad) for k, t in tensors},
        "modes": {k: m.training for k, m in mods.items()},
        "hooks": {
            k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for k, m in mods.items()
        },
        "plain": {k: {a: v for a, v in vars(m).items() if isinstance(v, _PLAIN)} for k, m in mods.items()},
        "attrs": [(t, t.clone()) for m in mods.values() for t in vars(m).values() if torch.is_tensor(t)],
        "inputs": [(t, t.clone()) for t in pytree.tree_flatten(ex)[0] if isinstance(t, torch.Tensor)],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module, ex: Any, rng: bool = True) -> None:
    after = snapshot(model, ex)
    assert after["tensors"].keys() == before["tensors"].keys(), "parameters or buffers added/removed"
    for name, (obj, value, requires_grad, grad) in before["tensors"].items():
        now = after["tensors"][name][0]
        assert now is obj, f"{name} was replaced by another tensor"
        assert torch.equal(now, value), f"{name} changed"
        assert now.requires_grad == requires_grad, f"{name}.requires_grad changed"
        assert now.grad is grad, f"{name}.grad changed"
    assert after["modes"] == before["modes"], "train/eval flags changed"
    assert after["hooks"] == before["hooks"], "hooks added or removed"
    assert after["plain"] == before["plain"], "plain attributes (counters, sizes) changed"
    assert all(torch.equal(t, value) for t, value in before["attrs"]), "a tensor attribute changed"
    for t, value in before["inputs"]:
        assert torch.equal(t, value), "the example input changed"
    assert not rng or torch.equal(after["rng"], before["rng"]), "torch's global RNG state was consumed"


# ------------------------------------------------------------------------------------------
# Every entry point; each gets the caller's model ``m`` and example ``ex``
# ------------------------------------------------------------------------------------------


def _plan(m: nn.Module, ex: Any, ratio: float = 0.5) -> graphprune.Plan:
    return graphprune.make_plan(copy.deepcopy(m), ex, ratio)


def _compact_copy(m: nn.Module, ex: Any) -> tuple[nn.Module, graphprune.Plan]:
    return graphprune.compact_with_plan(copy.deepcopy(m), ex, 0.5)


def _taylor(m: nn.Module, ex: Any, tmp: Path) -> None:
    data = [(ex, None)]  # gradients on copies: requires_grad and .grad stay as they were
    graphprune.compact(m, ex, 0.5, importance="taylor", data=data, loss_fn=lambda y, *_: y.square().mean())


def _save(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.save(m, tmp / "saved", _plan(m, ex, 0.0))  # m is the model being saved


def _load(m: nn.Module, ex: Any, tmp: Path) -> None:
    small, plan = _compact_copy(m, ex)
    graphprune.save(small, tmp / "saved", plan)
    graphprune.load(tmp / "saved", m, example_input=ex)


def _verify(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.verify_model(m, m, ex, _plan(m, ex, 0.0))  # the caller's model as original and small


def _engine(m: nn.Module, ex: Any, tmp: Path) -> None:
    engine = graphprune.Engine(m, ex)
    engine.verify(engine.realize(engine.plan(0.5)))
    engine.realize(engine.plan(0.3), last=True)


def _pruner(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.Pruner(m, ex, 0.5, steps=1).run()


def _recover(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.recover(copy.deepcopy(m), m, [(ex, None)], steps=1, progress=False)  # m: the teacher


def _lasso(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.GroupLasso(m, ex)(m)


def _masked_copy(m: nn.Module, ex: Any, tmp: Path) -> None:
    graphprune.unstructured.masked_copy(m)
    graphprune.unstructured.sparsity(m)
    graphprune.unstructured.RewindPoint(m)


Runner = Callable[[nn.Module, Any, Path], Any]
CASES: dict[str, tuple[str, Runner]] = {  # case id -> (public name, runner)
    "compact": ("compact", lambda m, ex, tmp: graphprune.compact(m, ex, 0.5)),
    "compact-taylor": ("compact", _taylor),
    "compact_with_plan": ("compact_with_plan", lambda m, ex, tmp: graphprune.compact_with_plan(m, ex, 0.5)),
    "make_plan": ("make_plan", lambda m, ex, tmp: graphprune.make_plan(m, ex, 0.5)),
    "analyze": ("analyze", lambda m, ex, tmp: graphprune.analyze(m, ex)),
    "apply_plan": ("apply_plan", lambda m, ex, tmp: graphprune.apply_plan(m, _plan(m, ex))),
    "verify_model": ("verify_model", _verify),
    "compact_to_target": ("compact_to_target", lambda m, ex, tmp: graphprune.compact_to_target(
        m, ex, target_params=0.8)),
    "sweep": ("sweep", lambda m, ex, tmp: graphprune.sweep(m, ex, ratios=(0.0, 0.5), latency=False)),
    "sensitivity": ("sensitivity", lambda m, ex, tmp: graphprune.sensitivity(
        m, ex, lambda mm: float(call(mm, ex).sum()), ratios=(0.5,), progress=False)),
    "Pruner": ("Pruner", _pruner),
    "Engine": ("Engine", _engine),
    "count_flops": ("count_flops", lambda m, ex, tmp: graphprune.count_flops(m, ex)),
    "count_params": ("count_params", lambda m, ex, tmp: graphprune.count_params(m)),
    "export_onnx": ("export_onnx", lambda m, ex, tmp: graphprune.export_onnx(m, ex, tmp / "m.onnx")),
    "benchmark": ("benchmark", lambda m, ex, tmp: graphprune.benchmark(m, m, ex, warmup=0, runs=1)),
    "measure_latency": ("measure_latency", lambda m, ex, tmp: graphprune.measure_latency(
        graphprune.export_onnx(copy.deepcopy(m), ex, tmp / "m.onnx").path, ex, warmup=0, runs=1)),
    "save": ("save", _save),
    "load": ("load", _load),
    "recover": ("recover", _recover),
    "GroupLasso": ("GroupLasso", _lasso),
    "bn_l1_penalty": ("bn_l1_penalty", lambda m, ex, tmp: graphprune.bn_l1_penalty(m)),
    "unstructured": ("unstructured", _masked_copy),
    "compact-reconstruct": ("compact", lambda m, ex, tmp: graphprune.compact(m, ex, 0.5, data=[ex, ex])),
    "compact-depth": ("compact", lambda m, ex, tmp: graphprune.compact(
        m, ex, 0.0, depth=1, depth_unit="branch")),
    "find_blocks": ("find_blocks", lambda m, ex, tmp: graphprune.find_blocks(m, ex, unit="branch")),
    "distributed": ("distributed", lambda m, ex, tmp: graphprune.distributed.fingerprint(m)),
}

# Public names that take no model and input of the caller's (types, errors, criteria), with why.
NOT_ENTRY_POINTS = {
    **dict.fromkeys(
        ["Analysis", "BenchmarkReport", "ExportResult", "Group", "LatencyStats", "Member", "Plan",
         "SensitivityTable", "TargetResult", "VerifyReport", "Block", "CheckpointResult",
         "__version__"],
        "a result type",
    ),
    **dict.fromkeys(
        ["GraphPruneError", "InputError", "PlanMismatchError", "TraceError", "VerificationError",
         "DistributedError", "SlowerModelWarning"],
        "an error or warning type",
    ),
    "Importance": "a criterion's base class: graphprune calls criteria on its own copies",
    "lamp": "builds a criterion: graphprune calls criteria on its own copies",
    "ReconstructOptions": "an options type (compact-reconstruct covers its use)",
    "SecondMoments": "a statistics accumulator over tensors it is given; it holds no model",
    "compact_checkpoint": "reads checkpoint folders, never a model object (tests/test_llm.py)",
}
# unstructured's magnitude_prune / random_prune / nm_prune / snip / make_permanent / find_ticket and
# recover's student change the model they are given, by contract (like torch.nn.utils.prune):
# the cases above cover what those calls must still leave alone.


# Training loops draw from torch's global RNG like any training step (dropout, shuffling).
TRAINING = {"recover"}


def test_every_public_name_is_classified() -> None:
    covered = {name for name, _ in CASES.values()}
    assert not covered & set(NOT_ENTRY_POINTS)
    missing = set(graphprune.__all__) - covered - set(NOT_ENTRY_POINTS)
    assert not missing, f"public names without a no-mutation case in {__file__}: {sorted(missing)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_call_leaves_model_and_input_unchanged(case: str, tmp_path: Path) -> None:
    form = FORMS[sorted(CASES).index(case) % len(FORMS)]  # every input form, spread over the cases
    model, ex = hostile(), example(form)
    before = snapshot(model, ex)
    try:
        CASES[case][1](model, ex, tmp_path)
    finally:  # a call that fails must leave everything as it was too
        assert_unchanged(before, model, ex, rng=case not in TRAINING)


@pytest.mark.parametrize("form", FORMS)
def test_compact_of_a_model_that_writes_into_itself(form: str) -> None:
    """verify=True (the default) holds the result to the original program run on copies of the
    caller's weights and input; ratio 0 gives the model itself back (same outputs)."""
    model, ex = hostile(), example(form)
    before = snapshot(model, ex)
    small = graphprune.compact(model, ex, 0.5)
    same = graphprune.compact(model, ex, 0.0)
    assert_unchanged(before, model, ex)
    assert graphprune.count_params(small) < graphprune.count_params(model)
    expected = call(copy.deepcopy(model).eval(), ex)
    assert torch.equal(call(same.eval(), ex), expected)
