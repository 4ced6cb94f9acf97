"""Importance criteria, where to cut (global / per-module / round_to) and the iterative Pruner.

Every check compares against something computed independently: a channel made clearly
unimportant by hand must be the one removed, Taylor and Hessian scores must equal sums written
out with autograd here, accumulated scores must equal the per-step sums, widths must be the
multiples asked for.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.errors import InputError
from graphprune.graph.analysis import Group, Member, analyze
from graphprune.planning.cut import round_keep
from graphprune.planning.importance import CRITERIA, Hessian, Taylor, lamp, resolve, scores_for
from graphprune.planning.plan import build_plan

DATA_DRIVEN = ["taylor", "hessian", "activation", "apoz"]
ALL = sorted(CRITERIA)


class TinyCNN(nn.Module):
    def __init__(self, c1: int = 6, c2: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny(seed: int = 0, **kw) -> TinyCNN:
    torch.manual_seed(seed)
    m = TinyCNN(**kw)
    with torch.no_grad():  # realistic BN parameters (defaults are all ones / zeros)
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


X = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def calib(n: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    def one() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 1, 6, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)

    return [one() for _ in range(n)]


def conv1_group(analysis) -> Group:
    return next(g for g in analysis.groups if any(m.name == "conv1.weight" and m.dim == 0 for m in g.members))


def scores(model: nn.Module, name: str, data=None) -> tuple[np.ndarray, Group]:
    analysis = analyze(model, X)
    crit = resolve(name)
    if getattr(crit, "needs_data", False):
        crit.prepare(analysis.model, data if data is not None else calib(), F.cross_entropy)
    g = conv1_group(analysis)
    return scores_for(crit, g, analysis.model), g


@pytest.mark.parametrize("name", ALL)
def test_every_criterion_gives_one_finite_score_per_unit_and_is_deterministic(name: str) -> None:
    model = tiny()
    a, g = scores(model, name)
    b, _ = scores(model, name)
    assert a.shape == (g.num_units,) == (6,)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_random_importance_depends_on_its_seed_only() -> None:
    from graphprune.planning.importance import RandomImportance

    model = tiny()
    analysis = analyze(model, X)
    g = conv1_group(analysis)
    np.testing.assert_array_equal(RandomImportance(3)(g, analysis.model), RandomImportance(3)(g, model))
    assert not np.array_equal(RandomImportance(3)(g, model), RandomImportance(4)(g, model))


def make_channel_unimportant(model: TinyCNN, k: int) -> TinyCNN:
    """Channel k of conv1: tiny filter, tiny BN scale, negative shift (dead after ReLU), tiny consumer."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.conv1.weight[k] *= 1e-3
        model.conv1.bias[k] *= 1e-3
        model.bn1.weight[k] *= 1e-3
        model.bn1.bias[k] = -0.05
        model.conv2.weight[:, k] *= 1e-3
    return model


@pytest.mark.parametrize("name", [n for n in ALL if n != "random"])
def test_a_clearly_unimportant_channel_is_the_one_removed(name: str) -> None:
    model = make_channel_unimportant(tiny(), 4)
    analysis = analyze(model, X)
    crit = resolve(name)
    if getattr(crit, "needs_data", False):
        crit.prepare(analysis.model, calib(), F.cross_entropy)
    plan = build_plan(analysis, 1 / 6, crit, name)  # removes exactly one of the 6 channels
    g = conv1_group(analysis)
    assert next(p for p in plan.groups if p.index == g.index).removed == [4]
    small = graphprune.apply_plan(model, plan)
    assert small.conv1.out_channels == 5 and small.conv2.in_channels == 5


@pytest.mark.parametrize("name", DATA_DRIVEN)
def test_data_driven_criteria_refuse_to_run_without_data(name: str) -> None:
    with pytest.raises(InputError, match="data="):
        graphprune.compact(tiny(), X, 0.3, importance=name)


def test_taylor_without_a_loss_names_loss_fn() -> None:
    with pytest.raises(InputError, match="loss_fn"):
        graphprune.compact(tiny(), X, 0.3, importance="taylor", data=calib())


def test_compact_with_taylor_runs_end_to_end_and_matches_the_plan() -> None:
    small, plan = graphprune.compact_with_plan(
        tiny(), X, 0.5, importance="taylor", data=calib(), loss_fn=F.cross_entropy
    )
    assert small.conv1.out_channels == 3 and small.conv2.out_channels == 4
    assert plan.importance == "taylor"


def hand_grads(model: nn.Module, batches) -> list[dict[str, torch.Tensor]]:
    out = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


def test_taylor_equals_mean_over_batches_of_abs_w_times_grad_summed_per_unit() -> None:
    model = tiny()
    data = calib()
    got, g = scores(model, "taylor", data)
    ref = copy.deepcopy(model)
    grads = hand_grads(ref, data)
    want = np.zeros(6)
    for m in g.members:
        p = dict(ref.named_parameters()).get(m.name)
        if p is None:
            continue
        t = sum((p.detach() * gr[m.name]).abs() for gr in grads) / len(grads)
        want += t.movedim(m.dim, 0).reshape(6, -1).sum(1).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_hessian_is_half_w2_times_mean_of_per_sample_squared_gradients() -> None:
    model = tiny()
    data = calib(n=2, batch=3)
    got, g = scores(model, "hessian", data)
    ref = copy.deepcopy(model)
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(len(x))]
    grads = hand_grads(ref, samples)
    want = np.zeros(6)
    params = dict(ref.named_parameters())
    for m in g.members:
        if m.name not in params:
            continue
        fisher = sum(gr[m.name] ** 2 for gr in grads) / len(grads)
        t = 0.5 * fisher * params[m.name].detach() ** 2
        want += t.movedim(m.dim, 0).reshape(6, -1).sum(1).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_activation_is_the_mean_abs_input_of_the_consumer() -> None:
    model = tiny()
    data = calib()
    got, _ = scores(model, "activation", data)
    seen = []
    h = model.conv2.register_forward_hook(lambda m, a, o: seen.append(a[0].abs().mean((0, 2, 3))))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    h.remove()
    np.testing.assert_allclose(got, torch.stack(seen).mean(0).double().numpy(), rtol=1e-5)


def test_lamp_keeps_the_order_inside_a_group_and_gives_the_top_unit_one() -> None:
    model = tiny()
    analysis = analyze(model, X)
    g = conv1_group(analysis)
    base = scores_for(resolve("l2"), g, analysis.model)
    lam = scores_for(lamp("l2"), g, analysis.model)
    np.testing.assert_array_equal(np.argsort(base, kind="stable"), np.argsort(lam, kind="stable"))
    assert lam.max() == pytest.approx(1.0)
    order = np.argsort(base)
    assert lam[order[0]] == pytest.approx(base[order[0]] / base.sum())


# -- where to cut --------------------------------------------------------------------------------


def test_global_pruning_caps_every_group_and_keeps_at_least_one_unit() -> None:
    model = tiny(c1=10, c2=10)
    analysis = analyze(model, X)
    g1 = conv1_group(analysis)

    def crit(group: Group, _model: nn.Module) -> np.ndarray:  # conv1's channels look worthless
        base = np.arange(group.num_units, dtype=float)
        return base * 1e-6 if group.index == g1.index else base + 1.0

    from graphprune.planning.cut import CutOptions

    plan = build_plan(analysis, 0.4, crit, "x", options=CutOptions(global_pruning=True, max_ratio=0.7))
    removed = {p.index: len(p.removed) for p in plan.groups if p.units > 1}
    assert removed[g1.index] == 7  # capped at 0.7 * 10, although all 8 of the target are cheapest there
    assert sum(removed.values()) == 8  # 0.4 * 20 units in the pool
    plan = build_plan(analysis, 0.6, crit, "x", options=CutOptions(global_pruning=True, max_ratio=1.0))
    removed = {p.index: len(p.removed) for p in plan.groups if p.units > 1}
    assert removed[g1.index] == 9  # max_ratio 1 still keeps one unit
    small = graphprune.apply_plan(model, plan)
    assert small.conv1.out_channels == 1 and small(X).shape == (2, 3)


def test_global_pruning_through_compact_reports_in_the_plan() -> None:
    small, plan = graphprune.compact_with_plan(
        tiny(c1=10, c2=12), X, 0.5, importance="lamp", global_pruning=True, round_to=1
    )
    assert any("global pruning" in n for n in plan.notes)
    assert small.conv1.out_channels + small.conv2.out_channels == 11


def test_round_to_makes_kept_widths_multiples_where_the_group_is_large_enough() -> None:
    model = tiny(c1=6, c2=24)
    small = graphprune.compact(model, X, 0.3, round_to=8)
    assert small.conv2.out_channels == 16  # 24 - round(7.2) = 17 -> 16
    assert small.conv1.out_channels == 4  # 6 units < 8: the ratio alone (6 - round(1.8))
    assert small.fc.in_features == 16


def test_round_to_counts_heads_as_blocks_of_positions() -> None:
    heads = np.arange(8)
    members = [Member("qkv.weight", 0, np.repeat(heads, 12)), Member("proj.weight", 1, np.repeat(heads, 4))]
    group = Group(0, 8, members)
    # 4 positions per head: a multiple of 8 features needs an even number of heads
    assert round_keep(group, 5, 8) in (4, 6)
    assert round_keep(group, 5, 4) == 5  # every head count already is a multiple of 4 features
    assert round_keep(group, 8, 8) == 8  # nothing removed: untouched


def test_per_module_ratios_override_the_default_and_unknown_keys_are_refused() -> None:
    # exact counts (round_to=1): what each ratio asks, not the aligned widths of the default
    small = graphprune.compact(tiny(c1=10, c2=10), X, 0.2, ratios={"conv2": 0.5}, round_to=1)
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 5
    small = graphprune.compact(tiny(c1=10, c2=10), X, 0.2, ratios={"bn1": 0.6}, round_to=1)  # bn1 too
    assert small.conv1.out_channels == 4
    with pytest.raises(InputError, match="match no prunable group"):
        graphprune.compact(tiny(), X, 0.2, ratios={"nope": 0.5})


# -- iterative pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize(("schedule", "widths"), [("linear", [8, 6, 4]), ("cubic", [6, 4, 4])])
def test_pruner_follows_its_schedule_from_the_original_widths(schedule: str, widths: list[int]) -> None:
    model = tiny(c1=10, c2=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = graphprune.Pruner(model, X, target_ratio=0.6, steps=3, schedule=schedule)
    got = []
    for _ in range(3):
        got.append(pruner.step().conv1.out_channels)
    assert got == widths
    assert pruner.done and pruner.model.conv2.out_channels == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    with pytest.raises(InputError):
        pruner.step()


def test_accumulated_taylor_equals_the_sum_of_per_step_measurements_by_hand() -> None:
    model = tiny(c1=10, c2=10)
    data = calib()
    snapshots: list[nn.Module] = [copy.deepcopy(model)]

    def finetune(m: nn.Module) -> None:  # move the weights, so step 2 measures a different model
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.1).add_(0.01)
        snapshots.append(copy.deepcopy(m))

    pruner = graphprune.Pruner(
        model, X, 0.4, 2, importance="taylor", data=data, loss_fn=F.cross_entropy, finetune=finetune
    )
    pruner.step()
    pruner.step()

    def taylor_by_hand(m: nn.Module) -> dict[str, torch.Tensor]:
        grads = hand_grads(m, data)
        params = m.named_parameters()
        return {n: sum((p.detach() * g[n]).abs() for g in grads) / len(grads) for n, p in params}

    def sliced(stats: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
        out = dict(stats)
        for name, dims in plan.slices.items():
            if name in out:
                for dim, kept in dims.items():
                    out[name] = out[name].index_select(dim, torch.tensor(kept))
        return out

    step1 = sliced(taylor_by_hand(snapshots[0]), pruner.plans[0])
    step2 = taylor_by_hand(snapshots[1])  # the model after step 1's shrink and fine-tuning
    expected = sliced({n: step1[n] + step2[n] for n in step2}, pruner.plans[1])
    crit = pruner.criterion
    assert isinstance(crit, Taylor) and crit.steps == 2
    for name, val in expected.items():
        torch.testing.assert_close(crit.stats[name], val, rtol=1e-5, atol=1e-8)
    # and step 2 removed the units with the lowest accumulated scores
    analysis = analyze(snapshots[1], X)
    g = conv1_group(analysis)
    unit = np.zeros(g.num_units)
    acc = {n: step1[n] + step2[n] for n in step2}
    for m in g.members:
        if m.name in acc:
            unit += acc[m.name].movedim(m.dim, 0).reshape(g.num_units, -1).sum(1).double().numpy()
    removed = next(p.removed for p in pruner.plans[1].groups if p.index == g.index)
    assert removed == sorted(np.argsort(unit, kind="stable")[: len(removed)].tolist())


def test_hessian_accumulates_across_calls_instead_of_keeping_the_last_sample() -> None:
    model = tiny()
    data = calib(n=1, batch=4)
    h = Hessian()
    h.accumulate = True
    h.prepare(model, data, F.cross_entropy)
    once = {k: v.clone() for k, v in h.stats.items()}
    h.prepare(model, data, F.cross_entropy)
    for k, v in h.stats.items():
        torch.testing.assert_close(v, 2 * once[k])


def test_soft_pruner_zeroes_units_keeps_shapes_then_removes_the_final_selection() -> None:
    model = tiny(c1=10, c2=10)
    pruner = graphprune.Pruner(model, X, 0.5, 2, soft=True)
    mid = pruner.step()
    assert mid.conv1.out_channels == 10  # shapes kept until the end
    zero_filters = int((mid.conv1.weight.flatten(1).abs().sum(1) == 0).sum())
    assert zero_filters == 2  # 0.5 * 1/2 of 10 (half the target at step 1 of 2)
    final = pruner.step()
    assert final.conv1.out_channels == 5 and final.conv2.out_channels == 5
    assert final(X).shape == (2, 3)


def test_per_position_by_slices_is_the_whole_tensors_sums(monkeypatch) -> None:
    """per_position reduces a weight a slice at a time (no weight-sized temporaries) and never
    moves ``dim`` to the front: the sums must be those of the whole tensor (float64 oracle), the
    same whatever the slice size, exactly zero for zero positions and equal for equal ones (ties
    stay ties)."""
    from graphprune.planning import scoring

    torch.manual_seed(0)
    # rows of 700 / 3000 values: slices of ~1500 / 350 rows, so several per tensor
    for t in (torch.randn(5000, 700), torch.randn(1400, 3000).to(torch.bfloat16), torch.randn(40, 3, 5, 5)):
        t = t.clone()
        t.select(t.dim() - 1, 1).zero_()  # a zero position along the last dim
        t.select(t.dim() - 1, 2).copy_(t.select(t.dim() - 1, 3))  # two equal ones
        for dim in range(t.dim()):
            whole = t.double().movedim(dim, 0).reshape(t.shape[dim], -1)
            for p, ref in ((0, whole.sum(1)), (1, whole.abs().sum(1)), (2, whole.pow(2).sum(1))):
                got = scoring.per_position(t, dim, p)
                assert got.shape == (t.shape[dim],)
                scale = whole.abs().pow(max(p, 1)).sum(1).numpy()  # error bound of a float32 sum
                assert np.all(np.abs(got - ref.numpy()) <= 1e-5 * scale + 1e-30), (t.shape, dim, p)
                with monkeypatch.context() as m:
                    m.setattr(scoring, "_CHUNK", 1 << 30)  # the whole tensor in one slice
                    one = scoring.per_position(t, dim, p)
                if dim == 0:
                    assert np.array_equal(got, one)  # rows are reduced on their own: bitwise
                else:
                    assert np.allclose(got, one, rtol=1e-5, atol=1e-6 * scale.max())
                if dim == t.dim() - 1:
                    assert got[1] == 0 and got[2] == got[3]


def test_per_position_of_a_zero_size_weight_is_zero_everywhere() -> None:
    from graphprune.planning import scoring

    for t in (torch.zeros(3, 0, 2), torch.zeros(0, 4)):
        for dim in range(t.dim()):
            for p in (0, 1, 2):
                got = scoring.per_position(t, dim, p)
                assert got.shape == (t.shape[dim],) and not got.any()
