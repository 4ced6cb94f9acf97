"""What verification costs, without weakening it (issue 12: graphprune's time on TinyLlama).

* ``verify`` runs the compact model once: the block-by-block run is also the shape check;
* ``compact(inplace=True)`` lets that run be the check that the model runs at all (no separate
  run after surgery), and a model that cannot run is still refused with the inplace message;
* the masked reference writes the user's weights' masked copies into reused buffers
  (reference/scratch.py): an op whose output is a view of such a copy must keep it;
* ``kept_view`` reads a broadcast mask without expanding it.

Each check injects the bug the shortcut could hide (a corrupted unit, a view overwritten by the
next weight, a wrong output shape) and requires it to be caught.
"""

from __future__ import annotations

import pytest
import torch
from test_verify_blocks import _Stack, _swap_columns, compacted_stack
from torch import nn

import graphprune
import graphprune.engine as engine
from graphprune.reference.run import kept_view
from graphprune.surgery.slicing import set_tensor


def _count_runs(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


stack = pytest.fixture(scope="module", name="stack")(compacted_stack)


def test_verification_runs_the_compact_model_once_and_still_names_a_corrupted_block(stack) -> None:
    model, x, _, plan = stack
    small = graphprune.apply_plan(model, plan)
    runs = _count_runs(small)
    report = graphprune.verify_model(model, small, x, plan)
    assert len(report.blocks) == 8 and all(p.ok for p in report.blocks)
    assert runs[0] == 1  # was 2: a plain run for the shapes, then the block-by-block run
    broken = graphprune.apply_plan(model, plan)
    set_tensor(broken, "blocks.1.fc1.weight", broken.blocks[1].fc1.weight.detach().flip(0))
    with pytest.raises(graphprune.VerificationError, match=r"block blocks\.1 \(_Block\) is the first block"):
        graphprune.verify_model(model, broken, x, plan)


def test_the_block_by_block_run_still_checks_the_output_shapes(stack) -> None:
    model, x, _, plan = stack
    broken = graphprune.apply_plan(model, plan)
    broken.head = nn.Linear(broken.head.in_features, 4)  # every block agrees, the output does not
    with pytest.raises(graphprune.VerificationError,
                       match=r"output shapes \[\(5, 4\)\] differ .*\[\(5, 3\)\]"):
        graphprune.verify_model(model, broken, x, plan)


class _Checks(nn.Module):
    """A forward that refuses any width but its own: cannot run once pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.shape[-1] != 16:
            raise ValueError("hidden width changed")
        return self.fc2(h)


def _count_plain_checks(monkeypatch) -> list[int]:
    """A list that grows by one per plain "does it run?" run of a compact model (find_failure)."""
    checked: list[int] = []
    find = engine.find_failure
    monkeypatch.setattr(engine, "find_failure", lambda *a: checked.append(1) or find(*a))
    return checked


def test_inplace_runs_the_compact_model_once_and_still_refuses_one_that_cannot_run(monkeypatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    checked = _count_plain_checks(monkeypatch)
    model = _Stack().eval()
    expected = graphprune.compact(_copy(model), x, 0.5)(x)
    checked.clear()
    small = graphprune.compact(model, x, 0.5, inplace=True)
    assert small is model and torch.allclose(small(x), expected, atol=1e-6)
    assert not checked  # verification's run was the check that it runs
    with pytest.raises(graphprune.GraphPruneError, match=r"compact\(inplace=True\): _Checks does not run at "
                       r"the new sizes \(ValueError: hidden width changed\)"):
        graphprune.compact(_Checks().eval(), x, 0.5, inplace=True)
    assert checked  # located after the failing verification, as before


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


class _Views(nn.Module):
    """Two same-shaped weights read through views (``w.view``) before either is used: the masked
    copy of the first must survive the second's (same scratch slot)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 6))
        self.w2 = nn.Parameter(torch.randn(16, 6))
        self.w3 = nn.Parameter(torch.randn(3, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1.view(self.w1.shape), self.w2.view(self.w2.shape)
        return nn.functional.linear(torch.relu(nn.functional.linear(x, a) + 2 * nn.functional.linear(x, b)),
                                    self.w3)


def test_a_view_of_a_masked_weight_keeps_its_buffer_and_corruption_is_still_caught() -> None:
    torch.manual_seed(0)
    model, x = _Views().eval(), torch.randn(5, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, plan = graphprune.compact_with_plan(model, x, ratio=0.5)  # verified against the reference
    assert any(g.removed for g in plan.groups)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # masking wrote no weight
    report = graphprune.verify_model(model, small, x, plan)
    assert report.errors and report.errors[0] < 1e-5
    broken = graphprune.apply_plan(model, plan)
    set_tensor(broken, "w3", _swap_columns(broken.w3))
    with pytest.raises(graphprune.VerificationError, match="does not match the reference"):
        graphprune.verify_model(model, broken, x, plan)


def test_kept_view_of_a_broadcast_mask_equals_the_expanded_one() -> None:
    torch.manual_seed(0)
    value = torch.randn(3, 4, 5)
    for keep, shape in (
        (torch.tensor([True, False, True, True, False]).reshape(1, 1, 5), (3, 4, 3)),
        (torch.tensor([True, False, True]).reshape(3, 1, 1), (2, 4, 5)),
        (torch.tensor([True, False, True, True]).reshape(4, 1), (3, 3, 5)),  # fewer dims than the value
        (torch.zeros(1, 1, 1, dtype=torch.bool), (0, 0, 0)),
    ):
        full = keep.reshape((1,) * (3 - keep.dim()) + tuple(keep.shape)).expand(value.shape)
        got = kept_view(value, keep)
        assert got is not None and tuple(got.shape) == shape
        assert torch.equal(got, value[full].reshape(shape))
    assert kept_view(torch.randn(2, 2), torch.tensor([[True, False], [False, True]])) is None  # no grid


def test_compact_runs_the_compact_model_once_and_still_falls_back_or_refuses(monkeypatch) -> None:
    """compact(verify=True): the verification's run is also the check that the model runs at the new
    sizes (no separate run after surgery); a model that cannot run still gets the fallback, and a
    model that runs but computes wrongly is still refused."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    checked = _count_plain_checks(monkeypatch)
    model = _Stack().eval()
    small = graphprune.compact(model, x, 0.5)
    assert not checked  # was one run after surgery, then verification's
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())

    with pytest.warns(UserWarning, match="kept whole"):
        kept = graphprune.compact(_Checks().eval(), x, 0.5)  # cannot run pruned: the freeze fallback
    assert checked  # the failing verification was followed by a run that locates the failure
    assert kept(x).shape == (4, 3)

    slice_tensors = engine.slice_tensors

    def corrupt(work: nn.Module, plan, on_slice=None) -> None:
        slice_tensors(work, plan, on_slice)
        set_tensor(work, "blocks.1.fc1.weight", work.blocks[1].fc1.weight.detach().flip(0))

    monkeypatch.setattr(engine, "slice_tensors", corrupt)
    with pytest.raises(graphprune.VerificationError, match="does not match the reference"):
        graphprune.compact(_Stack().eval(), x, 0.5)
