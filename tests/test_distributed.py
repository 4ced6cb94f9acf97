"""Distributed calibration and recovery on two CPU processes (gloo), checked against one process.

Two ranks are forked once for the whole module (fork: the children inherit the imported torch,
so starting them costs well under a second) and run every scenario in ``_rank_main`` in the
same order; the tests compare what the ranks return with what this process computes alone on
the union of the ranks' data:

* every data-driven statistic, all-reduced, equals the one-process statistic on the union;
* every rank makes the same plan, and it is the one-process plan on the union;
* after ``recover`` (DDP and FSDP) every rank holds the same weights, equal to one-process
  training on the union batches (DDP averages gradients of equal-size batches, which is the
  gradient of the union batch), and rank 0 alone wrote the checkpoint;
* bad input (different models or example inputs, a rank without data) raises on every rank.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune import distributed as gdist
from graphprune.planning.importance import resolve

WORLD = 2
CRITERIA = ("taylor", "hessian", "activation", "apoz")
PLANNED = ("taylor", "apoz")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def _example() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(2, 6)


def _data(rank: int, n_batches: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n_batches)]


def _union() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for r in range(WORLD) for b in _data(r)]


def _stats(name: str, model: nn.Module, data: Any) -> dict[str, Any]:
    crit = resolve(name)
    crit.prepare(model, data, F.cross_entropy)
    return {repr(k): torch.as_tensor(v).clone() for k, v in crit.stats.items()}


def _recover(strategy: str | None, data: Any, ckpt: Path | None = None, losses: list | None = None):
    teacher = _model()
    student = gp.apply_plan(teacher, gp.make_plan(teacher, _example(), 0.5))
    gp.recover(student, teacher, data, steps=3, lr=1e-2, strategy=strategy, progress=ckpt is not None,
               checkpoint=ckpt, checkpoint_every=2 if ckpt else 0,
               on_step=None if losses is None else (lambda s, v: losses.append(v)))
    return {k: v.clone() for k, v in student.state_dict().items()}


def _error(fn) -> str:
    try:
        fn()
    except gp.GraphPruneError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _run(out: dict[str, Any], key: str, fn) -> None:
    """``out[key] = fn()``, or what it raised: one broken scenario fails its own test only."""
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001 - compared by the parent's tests
        out[key] = f"raised {type(exc).__name__}: {exc}"


def _recover_logged(data: Any, ckpt: Path) -> dict[str, Any]:
    """DDP recovery with a progress bar, recording every torch.save call, every loss on_step
    sees and what went to stderr (where tqdm draws)."""
    saves: list[str] = []
    losses: list[float] = []
    real_save = torch.save
    torch.save = lambda obj, f, *a, **k: (saves.append(str(f)), real_save(obj, f, *a, **k))[1]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            weights = _recover(None, data, ckpt, losses)
    finally:
        torch.save = real_save
    return {"weights": weights, "saves": saves, "losses": losses, "stderr": stderr.getvalue()}


def _bn_recovered(data: Any) -> dict[str, torch.Tensor]:
    bn = _bn_model()
    gp.recover(bn, _bn_model(), data, steps=2, progress=False)
    return {k: v.clone() for k, v in bn.state_dict().items()}


def _reduced_in_buckets(rank: int) -> dict[str, Any]:
    """The helper other modules call: sums in float64 over buckets of a few elements."""
    gdist.BUCKET_ELEMENTS, old = 5, gdist.BUCKET_ELEMENTS
    try:
        mine = [torch.full((2, 3), rank + 1.0), torch.arange(4) * (rank + 1), torch.ones(())]
        return {"sum": gdist.all_reduce_sum(mine), "inputs": mine}
    finally:
        gdist.BUCKET_ELEMENTS = old


def _snip_masks(data: Any) -> dict[str, torch.Tensor]:
    masked = gp.unstructured.snip(_model(), data, 0.5, loss_fn=F.cross_entropy, max_batches=len(data))
    return {k: v.clone() for k, v in masked.state_dict().items() if k.endswith("_mask")}


def _reconstructed(data: Any) -> dict[str, torch.Tensor]:
    """compact with data= (least-squares reconstruction): its second moments are all-reduced."""
    small = gp.compact(_model(), _example(), 0.5, data=data)
    return {k: v.clone() for k, v in small.state_dict().items()}


def _rank_main(rank: int, tmp: str) -> dict[str, Any]:
    """Every scenario, in one fixed order (collectives pair up across ranks by order)."""
    out: dict[str, Any] = {}
    model, x, data = _model(), _example(), _data(rank)
    for name in CRITERIA:
        _run(out, f"stats/{name}", lambda name=name: _stats(name, model, data))
    for name in PLANNED:
        _run(out, f"plan/{name}", lambda name=name: gp.make_plan(
            model, x, 0.5, importance=name, data=data, loss_fn=F.cross_entropy).to_dict())
    with gdist.local():
        local_plan = gp.make_plan(model, x, 0.5, importance="taylor", data=data, loss_fn=F.cross_entropy)
    out["plan/local"] = local_plan.to_dict()
    _run(out, "plan/broadcast", lambda: gdist.broadcast_plan(local_plan if rank == 0 else None).to_dict())
    _run(out, "recover/ddp", lambda: _recover_logged(data, Path(tmp) / "ckpt.pt"))
    _run(out, "recover/fsdp", lambda: _recover("fsdp", data))
    _run(out, "recover/bn", lambda: _bn_recovered(data))
    _run(out, "reduce", lambda: _reduced_in_buckets(rank))
    _run(out, "snip", lambda: _snip_masks(data))
    _run(out, "reconstruct", lambda: _reconstructed(data))

    # bad input: every rank must raise (and stay in step for the next case)
    out["bad/shapes"] = _error(lambda: gdist.all_reduce_sum([torch.ones(2 + rank)]))
    out["bad/model"] = _error(lambda: gp.make_plan(_model(rank), x, 0.5))
    out["bad/input"] = _error(lambda: gp.make_plan(model, x + rank, 0.5))
    no_data = [] if rank == 1 else data
    out["bad/plan_data"] = _error(
        lambda: gp.make_plan(model, x, 0.5, importance="taylor", data=no_data, loss_fn=F.cross_entropy))
    out["bad/recover_data"] = _error(lambda: _recover(None, no_data))
    out["bad/teacher"] = _error(lambda: gp.recover(_model(), _model(rank), data, steps=1, progress=False))
    wrapped = torch.nn.parallel.DistributedDataParallel(_model())
    out["bad/wrapped"] = _error(lambda: gp.recover(wrapped, _model(), data, steps=1, progress=False))
    return out


def _child(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        result: Any = _rank_main(rank, tmp)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        result = traceback.format_exc()
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, Path(tmp) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks() -> tuple[list[dict[str, Any]], Path]:
    # paid once here, not in each rank: FSDP's imports and torch.export's first trace (~9 s)
    import torch.distributed.fsdp  # noqa: F401

    gp.make_plan(_model(), _example(), 0.5)

    tmp = Path(tempfile.mkdtemp(prefix="gp_dist_"))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_child, args=(r, str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for rank, p in enumerate(procs):
        path = tmp / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} ended with exit code {p.exitcode} and no result"
        res = torch.load(path, weights_only=False)
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
        results.append(res)
    return results, tmp


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert isinstance(a, dict) and isinstance(b, dict), (a, b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=atol), k


@pytest.mark.parametrize("name", CRITERIA)
def test_statistics_are_the_union_statistics(ranks, name):
    results, _ = ranks
    union = _stats(name, _model(), _union())
    local = _stats(name, _model(), _data(0))
    for r in results:
        _same(r[f"stats/{name}"], results[0][f"stats/{name}"])  # identical on every rank
        _same(r[f"stats/{name}"], union, atol=1e-7)
    # the oracle can tell: rank 0's data alone gives other statistics
    assert any(not torch.allclose(local[k].double(), union[k].double(), rtol=1e-3) for k in union)


@pytest.mark.parametrize("name", PLANNED)
def test_every_rank_makes_the_union_plan(ranks, name):
    results, _ = ranks
    union = gp.make_plan(_model(), _example(), 0.5, importance=name, data=_union(), loss_fn=F.cross_entropy)
    for r in results:
        assert r[f"plan/{name}"] == union.to_dict()


def test_snip_masks_by_the_union_of_the_ranks_batches(ranks):
    results, _ = ranks
    union, alone = _snip_masks(_union()), _snip_masks(_data(0))
    assert any(not torch.equal(union[k], alone[k]) for k in union)  # the oracle can tell
    for r in results:
        _same(r["snip"], union)


def test_reconstruction_uses_the_union_statistics(ranks):
    results, _ = ranks
    union, alone = _reconstructed(_union()), _reconstructed(_data(0))
    assert union.keys() != alone.keys() or any(  # the oracle can tell
        not torch.allclose(union[k], alone[k], atol=1e-4) for k in union)
    for r in results:
        _same(r["reconstruct"], results[0]["reconstruct"])  # identical on every rank
        _same(r["reconstruct"], union, atol=1e-5)


def test_local_plans_differ_and_broadcast_makes_them_one(ranks):
    results, _ = ranks
    assert results[0]["plan/local"]["slices"] != results[1]["plan/local"]["slices"]
    for r in results:
        assert r["plan/broadcast"] == results[0]["plan/local"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_recover_trains_data_parallel(ranks, strategy):
    results, _ = ranks
    got = [r[f"recover/{strategy}"] for r in results]
    got = [g["weights"] if strategy == "ddp" else g for g in got]
    for g in got:
        _same(g, got[0])
    # one process, each step on the union of the ranks' step batches
    steps = [(torch.cat([a[0], b[0]]), None) for a, b in zip(_data(0), _data(1))]
    reference = _recover("local", steps)
    _same(got[0], reference, atol=1e-6)
    alone = _recover("local", _data(0))
    assert not all(torch.allclose(alone[k], reference[k], atol=1e-4) for k in reference)


def test_recover_logs_and_checkpoints_once(ranks):
    results, tmp = ranks
    first, second = results[0]["recover/ddp"], results[1]["recover/ddp"]
    assert len(first["saves"]) == 2 and not second["saves"]  # steps 2 and 3, rank 0 only
    assert len(first["losses"]) == 3 and first["losses"] == second["losses"]  # mean over ranks
    assert "recover (distillation, ddp)" in first["stderr"] and not second["stderr"]  # bar on rank 0
    saved = torch.load(tmp / "ckpt.pt")
    assert saved["step"] == 3
    _same(saved["state_dict"], first["weights"])


def test_recover_ends_with_the_same_buffers(ranks):
    results, _ = ranks
    _same(results[0]["recover/bn"], results[1]["recover/bn"])
    assert results[0]["recover/bn"]["1.num_batches_tracked"] == 2


def test_all_reduce_sum_adds_every_rank_in_buckets(ranks):
    results, _ = ranks
    expected = [torch.full((2, 3), 3.0), torch.arange(4) * 3, torch.tensor(2.0)]
    for rank, r in enumerate(results):
        for got, want in zip(r["reduce"]["sum"], expected):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(r["reduce"]["inputs"][0], torch.full((2, 3), rank + 1.0))  # inputs untouched
        assert r["bad/shapes"].startswith("DistributedError") and "shapes" in r["bad/shapes"]


def test_different_models_or_inputs_are_refused_on_every_rank(ranks):
    results, _ = ranks
    for key, what in (("bad/model", "model"), ("bad/input", "example input"), ("bad/teacher", "teacher")):
        for r in results:
            assert r[key].startswith("DistributedError"), r[key]
            assert f"the {what} differs" in r[key] and "rank(s) [1]" in r[key], r[key]


def test_an_already_wrapped_student_is_refused(ranks):
    results, _ = ranks
    for r in results:
        assert r["bad/wrapped"].startswith("InputError") and "already wrapped" in r["bad/wrapped"]


def test_a_rank_without_data_stops_every_rank(ranks):
    results, _ = ranks
    for key in ("bad/plan_data", "bad/recover_data"):
        assert results[1][key].startswith("InputError") and "no batches" in results[1][key]
        assert results[0][key].startswith("DistributedError") and "rank(s) [1]" in results[0][key]


def test_distributed_work_without_a_process_group_is_refused():
    assert not gdist.is_initialized()
    with pytest.raises(gp.DistributedError, match="init_process_group"):
        gp.recover(_model(), _model(), _data(0), steps=1, strategy="ddp", progress=False)
    with pytest.raises(gp.InputError, match="strategy"):
        gp.recover(_model(), _model(), _data(0), steps=1, strategy="zero", progress=False)
    # without a process group the helpers are the identity
    t = [torch.ones(3)]
    assert gdist.all_reduce_sum(t)[0] is t[0] and gdist.world_size() == 1 and gdist.is_main()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_example_under_torchrun(strategy, request):
    """The documented launch: ``torchrun --nproc_per_node=2 examples/distributed_recover.py``
    (two fresh interpreters: ~40 s on a busy machine, so only with ``-m slow`` or GRAPHPRUNE_SLOW=1)."""
    asked = "slow" in (request.config.getoption("markexpr", "") or "").replace("not slow", "")
    if not (asked or os.environ.get("GRAPHPRUNE_SLOW")):
        pytest.skip("starts two interpreters under torchrun: run with -m slow or GRAPHPRUNE_SLOW=1")
    root = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    script = ["examples/distributed_recover.py", "--tiny", "--strategy", strategy]
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", *script],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ranks: 2,") == 1  # rank 0 alone reports and saves


def test_fingerprints_see_names_shapes_and_values_not_addresses():
    x = torch.arange(6.0).reshape(2, 3)
    a, b = {"x": x, "opt": object()}, {"x": x.clone(), "opt": object()}
    assert gdist.fingerprint(a) == gdist.fingerprint(b)
    assert gdist.fingerprint(x) != gdist.fingerprint(x + 1e-6)
    assert gdist.fingerprint(x) != gdist.fingerprint(x.reshape(3, 2))
    assert gdist.fingerprint(_model(0)) == gdist.fingerprint(_model(0))
    assert gdist.fingerprint(_model(0)) != gdist.fingerprint(_model(1))
    assert gdist.fingerprint(_model(0), values=False) == gdist.fingerprint(_model(1), values=False)
