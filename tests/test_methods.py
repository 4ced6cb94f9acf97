"""Classic methods (unstructured masks, N:M, SNIP, lottery-ticket rewind), sparsity penalties,
sensitivity analysis and recovery by distillation.

Oracles: masks are checked element by element against the weights they were computed from;
sensitivity by masking must equal sensitivity by real compaction; penalties equal sums written
out here; recovery must lower the distillation loss measured on held-out batches.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune import unstructured as U
from graphprune.errors import InputError
from graphprune.methods.recover import evaluate_distillation


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    return m.eval()


X = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def batches(n: int, seed: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    def one() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 1, 6, 6, generator=g), torch.randint(0, 4, (size,), generator=g)

    return [one() for _ in range(n)]


# -- unstructured ---------------------------------------------------------------------------------


def test_local_magnitude_pruning_zeroes_the_smallest_share_of_every_tensor_and_keeps_shapes() -> None:
    model = net()
    originals = {n: m.weight.detach().clone() for n, m in layers(model)}
    U.magnitude_prune(model, 0.5)
    for name, w0 in originals.items():
        w = model.get_submodule(name).weight
        assert w.shape == w0.shape
        zero = w == 0
        assert int(zero.sum()) == round(0.5 * w.numel())
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # the smallest ones went
        torch.testing.assert_close(w[~zero], w0[~zero])
    report = U.sparsity(model)
    assert report.overall == pytest.approx(0.5, abs=0.01)


def test_global_magnitude_pruning_uses_one_threshold_across_tensors() -> None:
    model = net()
    originals = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    U.magnitude_prune(model, 0.7, scope="global")
    now = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    removed = torch.cat([w0[w == 0].abs() for w0, w in zip(originals, now)])
    kept = torch.cat([w0[w != 0].abs() for w0, w in zip(originals, now)])
    assert removed.max() <= kept.min()
    assert removed.numel() == round(0.7 * (removed.numel() + kept.numel()))
    assert model(X).shape == (2, 4)


def test_amount_is_the_final_sparsity_so_repeating_a_call_changes_nothing() -> None:
    model = net()
    U.magnitude_prune(model, 0.5)
    mask = model.conv2.weight_mask.clone()
    U.magnitude_prune(model, 0.5)
    assert torch.equal(model.conv2.weight_mask, mask)


def test_random_pruning_is_deterministic_for_a_seed() -> None:
    a, b, c = net(), net(), net()
    U.random_prune(a, 0.4, seed=1)
    U.random_prune(b, 0.4, seed=1)
    U.random_prune(c, 0.4, seed=2)
    assert torch.equal(a.conv2.weight_mask, b.conv2.weight_mask)
    assert not torch.equal(a.conv2.weight_mask, c.conv2.weight_mask)
    assert U.sparsity(a).overall == pytest.approx(0.4, abs=0.01)


def test_two_four_masks_keep_the_two_largest_of_every_four_inputs() -> None:
    model = net()
    w0 = model.conv2.weight.detach().clone()
    U.nm_prune(model, 2, 4, params=["conv2", "fc"])
    w = model.conv2.weight.detach()
    blocks0 = w0.movedim(1, -1).reshape(-1, 4).abs()
    blocks = w.movedim(1, -1).reshape(-1, 4)
    assert ((blocks != 0).sum(1) == 2).all()
    kept_min = torch.where(blocks != 0, blocks0, torch.full_like(blocks0, np.inf)).min(1).values
    dropped_max = torch.where(blocks == 0, blocks0, torch.zeros_like(blocks0)).max(1).values
    assert (dropped_max <= kept_min).all()
    with pytest.raises(InputError, match="multiple of 4"):
        U.nm_prune(net(), 2, 4, params=["conv1"])  # 1 input channel


def test_snip_masks_the_least_sensitive_connections_and_needs_data() -> None:
    model = net(seed=3)
    data = batches(1, 5)
    ref = copy.deepcopy(model)
    x, y = data[0]
    F.cross_entropy(ref(x), y).backward()
    sens = torch.cat([(m.weight.grad * m.weight).abs().flatten() for _, m in layers(ref)])
    U.snip(model, data, 0.6, loss_fn=F.cross_entropy)
    masks = torch.cat([m.weight_mask.flatten() for _, m in layers(model)])
    assert int((masks == 0).sum()) == round(0.6 * masks.numel())
    assert sens[masks == 0].max() <= sens[masks == 1].min() + 1e-12
    with pytest.raises(InputError, match="data"):
        U.snip(net(), None, 0.5, loss_fn=F.cross_entropy)


def test_make_permanent_folds_masks_without_changing_outputs() -> None:
    model = net()
    U.magnitude_prune(model, 0.5)
    before = model(X)
    U.make_permanent(model)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    torch.testing.assert_close(model(X), before)
    assert U.sparsity(model).overall == pytest.approx(0.5, abs=0.01)


def test_rewinding_restores_the_saved_weights_under_the_current_masks() -> None:
    model = net()
    point = U.RewindPoint(model)
    init = {n: m.weight.detach().clone() for n, m in layers(model)}

    def train(m: nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))

    ticket = U.find_ticket(model, train, sparsity_target=0.75, rounds=2)
    for name, w0 in init.items():
        mod = ticket.get_submodule(name)
        torch.testing.assert_close(mod.weight, w0 * mod.weight_mask)
    assert U.sparsity(ticket).overall == pytest.approx(0.75, abs=0.01)
    assert point.state.keys() == U.RewindPoint(ticket).state.keys()


# -- sparsity penalties -------------------------------------------------------------------------


def test_bn_l1_penalty_is_the_scaled_sum_of_gammas() -> None:
    model = net()
    want = 1e-3 * (model.bn1.weight.abs().sum() + model.bn2.weight.abs().sum())
    torch.testing.assert_close(graphprune.bn_l1_penalty(model, 1e-3), want)


def test_group_lasso_sums_the_norms_of_whole_coupled_units() -> None:
    model = net()
    lasso = graphprune.GroupLasso(model, X, strength=0.5)
    # conv1 channel c: conv1 filter + bias, bn1 gamma + beta, conv2 input slice
    c1 = (
        model.conv1.weight.pow(2).sum((1, 2, 3)) + model.conv1.bias.pow(2) + model.bn1.weight.pow(2)
        + model.bn1.bias.pow(2) + model.conv2.weight.pow(2).sum((0, 2, 3))
    )
    c2 = (
        model.conv2.weight.pow(2).sum((1, 2, 3)) + model.conv2.bias.pow(2) + model.bn2.weight.pow(2)
        + model.bn2.bias.pow(2) + model.fc.weight.pow(2).sum(0)
    )
    want = 0.5 * (c1.sqrt().sum() + c2.sqrt().sum())
    got = lasso(model)
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.conv2.weight.grad is not None


# -- sensitivity ------------------------------------------------------------------------------


def test_sensitivity_by_masking_equals_sensitivity_by_real_compaction() -> None:
    model = net()
    ref = model(X).detach()

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(X) - ref).abs().max())

    masked = graphprune.sensitivity(model, X, error, (0.25, 0.5), higher_is_better=False, progress=False)
    real = graphprune.sensitivity(
        model, X, error, (0.25, 0.5), higher_is_better=False, progress=False, mode="compact"
    )
    assert [r.units for r in masked.rows] == [8, 12]
    for a, b in zip(masked.rows, real.rows):
        for r in (0.25, 0.5):
            assert a.metric[r] == pytest.approx(b.metric[r], abs=1e-5)
            assert a.metric[r] > 0  # pruning alone changes the output
    assert "0.25" in str(masked) and "| group |" in masked.to_markdown()


def test_proposed_ratios_reach_the_target_and_are_accepted_by_compact(tmp_path) -> None:
    model = net()
    ref = model(X).detach()
    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(X) - ref).abs().max())

    table = graphprune.sensitivity(model, X, error, (0.25, 0.5), higher_is_better=False, progress=False)
    proposal = table.propose(0.3)
    removed = sum(round(r * row.units) for row in table.rows for k, r in proposal.items() if k == row.key)
    assert removed >= 0.3 * 20
    small = graphprune.compact(model, X, 0.0, ratios=proposal, round_to=1)  # exact counts
    assert small.conv1.out_channels + small.conv2.out_channels == 20 - removed
    pytest.importorskip("matplotlib")
    table.plot(tmp_path / "sens.png")
    assert (tmp_path / "sens.png").stat().st_size > 1000


# -- recovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_recover_lowers_the_distillation_loss_on_held_out_batches(loss: str) -> None:
    teacher = net()
    student = graphprune.compact(teacher, X, 0.5)
    held_out = batches(2, 9)
    before = evaluate_distillation(student, teacher, held_out, loss=loss)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = graphprune.recover(student, teacher, batches(4, 7), steps=40, loss=loss, lr=3e-3, progress=False)
    assert out is student and not student.training  # the mode it came in with
    after = evaluate_distillation(student, teacher, held_out, loss=loss)
    assert after < 0.7 * before
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


def test_recover_refuses_bad_arguments() -> None:
    teacher = net()
    with pytest.raises(InputError, match="loss"):
        graphprune.recover(teacher, teacher, batches(1, 0), steps=1, loss="ce", progress=False)
    with pytest.raises(InputError, match="no batches"):
        graphprune.recover(copy.deepcopy(teacher), teacher, [], steps=1, progress=False)
