"""The user's model and inputs never change, whatever the forward does (issue 10, item 2)."""
from __future__ import annotations
import copy, tempfile
from pathlib import Path
import pytest, torch
from torch import nn
import graphprune

class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, max_norm=1.0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.emb.weight.mul_(5.0)
    def forward(self, x, ids=None):
        with torch.no_grad():
            self.conv.weight.clamp_(-0.1, 0.1)
        x.mul_(0.5)
        y = self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        if ids is not None:
            y = y + self.emb(ids).sum(1)
        return self.head(y)

def hostile():
    torch.manual_seed(0)
    m = Hostile()
    m.calls = 0
    def count(mod, args, out):
        mod.calls = getattr(mod, "calls", 0)
    m.conv2.register_forward_hook(count)
    m.head.register_forward_pre_hook(lambda mod, args: None)
    m.train()
    m.bn.eval()
    return m

def inputs(form):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=g)
    ids = torch.randint(0, 12, (2, 3), generator=g)
    return {"tensor": x, "tuple": (x, ids), "dict": {"x": x, "ids": ids}}[form]

def snapshot(model, example):
    leaves = torch.utils._pytree.tree_flatten(example)[0]
    mods = dict(model.named_modules())
    return {
        "tensors": {k: (v, v.detach().clone(), v.requires_grad, v.grad) for k, v in
                    [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]},
        "modes": {k: m.training for k, m in mods.items()},
        "hooks": {k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for k, m in mods.items()},
        "inputs": [(t, t.clone()) for t in leaves if isinstance(t, torch.Tensor)],
        "rng": torch.get_rng_state(),
    }

def assert_same(before, model, example):
    after = snapshot(model, example)
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (obj, val, rg, grad) in before["tensors"].items():
        obj2 = after["tensors"][k][0]
        assert obj2 is obj, f"{k} replaced"
        assert torch.equal(obj2, val), f"{k} changed"
        assert obj2.requires_grad == rg and obj2.grad is grad, f"{k} flags changed"
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    for t, v in before["inputs"]:
        assert torch.equal(t, v), "example input changed"
    assert torch.equal(after["rng"], before["rng"]), "global RNG consumed"

def _plan(model, ex):
    return graphprune.make_plan(copy.deepcopy(model), ex, 0.5)

def run_compact(m, ex, tmp): graphprune.compact(m, ex, 0.5)
def run_make_plan(m, ex, tmp): graphprune.make_plan(m, ex, 0.5)
def run_analyze(m, ex, tmp): graphprune.analyze(m, ex)
def run_cwp(m, ex, tmp): graphprune.compact_with_plan(m, ex, 0.5)
def run_apply(m, ex, tmp): graphprune.apply_plan(m, _plan(m, ex))
def run_verify(m, ex, tmp):
    small, plan = graphprune.compact_with_plan(copy.deepcopy(m), ex, 0.5)
    graphprune.verify_model(m, small, ex, plan)
def run_count_flops(m, ex, tmp): graphprune.count_flops(m, ex)
def run_count_params(m, ex, tmp): graphprune.count_params(m)
def run_export(m, ex, tmp): graphprune.export_onnx(m, ex, Path(tmp) / "m.onnx")
def run_benchmark(m, ex, tmp): graphprune.benchmark(m, m, ex, warmup=0, runs=1)
def call(m, ex):
    ex = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ex)
    return m(**ex) if isinstance(ex, dict) else m(*((ex,) if isinstance(ex, torch.Tensor) else ex))
def run_sens(m, ex, tmp): graphprune.sensitivity(m, ex, lambda mm: float(call(mm, ex).sum()), ratios=(0.5,), progress=False)
def run_target(m, ex, tmp): graphprune.compact_to_target(m, ex, target_params=0.8)
def run_sweep(m, ex, tmp): graphprune.sweep(m, ex, ratios=(0.0, 0.5), latency=False)
def run_pruner(m, ex, tmp):
    p = graphprune.Pruner(m, ex, 0.5, steps=1); p.step()
def run_save(m, ex, tmp): graphprune.save(m, Path(tmp) / "s", graphprune.make_plan(copy.deepcopy(m), ex, 0.0))
def run_load(m, ex, tmp):
    small, plan = graphprune.compact_with_plan(copy.deepcopy(m), ex, 0.5)
    graphprune.save(small, Path(tmp) / "s", plan)
    graphprune.load(Path(tmp) / "s", m, example_input=ex)
def run_lasso(m, ex, tmp): graphprune.GroupLasso(m, ex)(m)
def run_bnl1(m, ex, tmp): graphprune.bn_l1_penalty(m)
def run_recover(m, ex, tmp):
    graphprune.recover(copy.deepcopy(m), m, [(ex, None)], steps=1, progress=False)

ENTRY = dict(compact=run_compact, make_plan=run_make_plan, analyze=run_analyze, compact_with_plan=run_cwp,
  apply_plan=run_apply, verify_model=run_verify, count_flops=run_count_flops, count_params=run_count_params,
  export_onnx=run_export, benchmark=run_benchmark, sensitivity=run_sens, compact_to_target=run_target,
  sweep=run_sweep, Pruner=run_pruner, save=run_save, load=run_load, GroupLasso=run_lasso, bn_l1_penalty=run_bnl1,
  recover=run_recover)
FORMS = ["tensor", "tuple", "dict"]

@pytest.mark.parametrize("name", sorted(ENTRY))
@pytest.mark.parametrize("form", FORMS)
def test_untouched(name, form, tmp_path):
    m = hostile(); ex = inputs(form)
    before = snapshot(m, ex)
    try:
        ENTRY[name](m, ex, tmp_path)
    except graphprune.GraphPruneError as e:
        print("ERR", e)
        raise
    finally:
        assert_same(before, m, ex)
