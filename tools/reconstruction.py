"""Accuracy right after pruning, no fine-tuning: criteria vs ``reconstruct=True`` vs Torch-Pruning.

    python tools/reconstruction.py [--models cnn,mlp,transformer,lm] [--ratios 0.3,0.5]
                                   [--seeds 3] [--out docs/methods/reconstruction_table.md] [--quick]

Four models are trained here in the run (no download, a few CPU minutes in all):

* ``cnn``: graphprune's DigitsCNN (conv-BN-ReLU x3) on scikit-learn's 8x8 digits;
* ``mlp``: a 64-128-64-10 ReLU MLP on the same digits;
* ``transformer``: tools/accuracy.py's 2-block pointer transformer (4 heads of 8, MLP 64);
* ``lm``: a character-level language model (embedding 32, two stacked 1-layer LSTMs of 128,
  Linear to the vocabulary) trained on Python standard-library source files, scored by
  perplexity on held-out text from other files.

For every ratio each model is pruned, **without any training afterwards**, by graphprune with
``l2``, ``taylor``, ``hessian``, ``activation``, random scores, ``reconstruct=True`` and
``reconstruct=ReconstructOptions(selection="plan")`` (the l2 units, refit only), and by
Torch-Pruning 1.6 (``MetaPruner``) with its corresponding importances, from the same trained
weights in the same process. Everything that depends on a random draw (the calibration
sample, random scores) is repeated over ``--seeds`` seeds and shown as mean +- std. The
calibration data is 4 batches of 64 training samples (LM: 32 sequences of 64 characters),
the same for both libraries; reconstruction uses the inputs only, no labels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from accuracy import Task, make_cnn, make_transformer, tp_prune, train_generic  # noqa: E402

import graphprune  # noqa: E402
from graphprune.cli.demo import load_digits_data  # noqa: E402

GP_ROWS = ["l2", "taylor", "hessian", "activation", "random", "l2 + refit", "reconstruct"]
TP_ROWS = ["l2", "taylor", "hessian", "activation", "random"]
SEEDED = {"taylor", "hessian", "activation", "random", "l2 + refit", "reconstruct"}


# ------------------------------------------------------------------------------------------
# Extra tasks: digits MLP, character-level LSTM language model
# ------------------------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_mlp(quick: bool) -> Task:
    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsMLP()
    train_generic(model, data.x_train, data.y_train, 10 if quick else 40, 3e-3, 0)
    return Task("mlp (64-128-64-10 on sklearn digits)", model, data.x_train, data.y_train,
                data.x_test, data.y_test, data.x_test[:8].clone(), lambda m: [m.fc3])


class CharLM(nn.Module):
    def __init__(self, vocab: int, emb: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn1 = nn.LSTM(emb, hidden, batch_first=True)
        self.rnn2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn1(self.embed(tokens))
        h, _ = self.rnn2(h)
        return self.head(h)


def stdlib_text(chars: int) -> tuple[str, str]:
    """Training and held-out text: Python standard-library sources (other files for each)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 20_000)
    train, test = [], []
    n_train = n_test = 0
    for i, p in enumerate(files):
        text = p.read_text(encoding="utf-8", errors="replace")
        if i % 10 == 9 and n_test < chars // 8:
            test.append(text)
            n_test += len(text)
        elif n_train < chars:
            train.append(text)
            n_train += len(text)
    return "".join(train)[:chars], "".join(test)[: chars // 8]


def lm_tensors(text: str, stoi: dict[str, int], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long)
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1 : n * seq + 1].reshape(n, seq)
    return x, y


def lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def make_lm(quick: bool) -> Task:
    torch.manual_seed(0)
    train_text, test_text = stdlib_text(200_000 if quick else 600_000)
    chars = sorted({c for c in train_text if train_text.count(c) >= 20})
    stoi = {c: i + 1 for i, c in enumerate(chars)}  # 0 = anything rare
    vocab = len(chars) + 1
    x_tr, y_tr = lm_tensors(train_text, stoi, 64)
    x_te, y_te = lm_tensors(test_text, stoi, 64)
    model = CharLM(vocab)
    gen = torch.Generator().manual_seed(0)
    steps = 300 if quick else 1000
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (32,), generator=gen)
        loss = lm_loss(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return Task(f"lm (character LSTM 2x128 on Python stdlib source, vocab {vocab})", model, x_tr, y_tr,
                x_te[:256], y_te[:256], x_te[:8].clone(), lambda m: [m.head])


# ------------------------------------------------------------------------------------------
# Metrics and pruning drivers
# ------------------------------------------------------------------------------------------


@dataclass
class Spec:
    task: Task
    metric: str  # "accuracy" or "perplexity"
    loss_fn: Callable[..., torch.Tensor]
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score(spec: Spec, model: nn.Module) -> float:
    t = spec.task
    model.eval()
    with torch.no_grad():
        out = model(t.x_test)
        if spec.metric == "perplexity":
            return float(torch.exp(lm_loss(out, t.y_test)))
        return float((out.argmax(1) == t.y_test).float().mean())


def calibration(task: Task, seed: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(task.x_train), generator=gen)
    return [(task.x_train[perm[i * size : (i + 1) * size]], task.y_train[perm[i * size : (i + 1) * size]])
            for i in range(4)]


def random_scores(seed: int) -> Callable[[Any, nn.Module], np.ndarray]:
    def crit(group: Any, model: nn.Module) -> np.ndarray:
        return np.random.default_rng(seed * 7919 + group.index).random(group.num_units)

    return crit


def gp_prune(spec: Spec, row: str, ratio: float, calib: list[Any], seed: int) -> tuple[nn.Module, Any]:
    t = spec.task
    kw: dict[str, Any] = {}
    if row in ("taylor", "hessian", "activation"):
        kw = {"importance": row, "data": calib, "loss_fn": spec.loss_fn}
    elif row == "random":
        kw = {"importance": random_scores(seed)}
    elif row == "reconstruct":
        kw = {"data": [x for x, _ in calib], "reconstruct": True}  # inputs only: no labels
    elif row == "l2 + refit":
        kw = {"data": [x for x, _ in calib], "reconstruct": graphprune.ReconstructOptions(selection="plan")}
    return graphprune.compact_with_plan(t.model, t.example, ratio, **kw)


def tp_run(spec: Spec, row: str, ratio: float, calib: list[Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)  # TP's RandomImportance draws from torch's generator
    return tp_prune(spec.task, row, ratio, calib, loss_fn=spec.loss_fn, per_sample=spec.per_sample)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def fmt(values: list[float], metric: str) -> str:
    if not values:
        return "—"
    if metric == "accuracy":
        vals = [100 * v for v in values]
        unit = "%"
    else:
        vals, unit = values, ""
    if len(vals) == 1:
        return f"{vals[0]:.1f}{unit}" if metric == "accuracy" else f"{vals[0]:.2f}"
    m, s = statistics.mean(vals), statistics.stdev(vals)
    return f"{m:.1f} ± {s:.1f}{unit}" if metric == "accuracy" else f"{m:.2f} ± {s:.2f}"


@dataclass
class Results:
    cells: dict[tuple[float, str, str], list[float]] = field(default_factory=dict)
    params: dict[tuple[float, str, str], int] = field(default_factory=dict)
    errors: dict[tuple[float, str, str], str] = field(default_factory=dict)
    cost: dict[tuple[float, str], list[tuple[float, float]]] = field(default_factory=dict)


def prune_once(spec: Spec, lib: str, row: str, ratio: float, seed: int, res: Results) -> None:
    """One pruning, scored; a failure is recorded as a result."""
    key = (ratio, lib, row)
    calib = calibration(spec.task, seed, 32 if spec.metric == "perplexity" else 64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lib == "graphprune":
            small, plan = gp_prune(spec, row, ratio, calib, seed)
            rec = getattr(plan, "reconstruction", None)
            mib = rec.peak_bytes / 2**20 if rec else 0.0
            res.cost.setdefault((ratio, row), []).append((time.perf_counter() - t0, mib))
        else:
            small = tp_run(spec, row, ratio, calib, seed)
    res.cells.setdefault(key, []).append(score(spec, small))
    res.params[key] = graphprune.count_params(small)


def measure(spec: Spec, ratios: list[float], seeds: int, log: Callable[[str], None]) -> Results:
    res = Results()
    with warnings.catch_warnings():  # warm-up: the first torch.export in a process is slow
        warnings.simplefilter("ignore")
        graphprune.compact(spec.task.model, spec.task.example, 0.1, verify=False)
    for ratio in ratios:
        for lib, rows in (("graphprune", GP_ROWS), ("torch-pruning", TP_ROWS)):
            for row in rows:
                key = (ratio, lib, row)
                for seed in range(seeds if row in SEEDED else 1):
                    try:
                        prune_once(spec, lib, row, ratio, seed, res)
                    except Exception as exc:  # noqa: BLE001 - a failure is a result
                        first = str(exc).splitlines()[0][:70] if str(exc) else ""
                        res.errors[key] = f"{type(exc).__name__}: {first}"
                        break
                log(f"  {ratio} {lib:<13} {row:<12} {fmt(res.cells.get(key, []), spec.metric)} "
                    f"{res.errors.get(key, '')}")
    return res


def cell(res: Results, key: tuple[float, str, str], metric: str) -> str:
    if key[1] == "torch-pruning" and key[2] not in TP_ROWS:
        return " | "
    if key in res.errors:
        return f"failed: {res.errors[key]} | "
    return f"{fmt(res.cells.get(key, []), metric)} | {res.params.get(key, 0):,}"


def verdict(res: Results, ratio: float, metric: str) -> str:
    """Does reconstruct beat every plain criterion (both libraries) at this ratio?"""
    def mean(key: tuple[float, str, str]) -> float | None:
        vals = res.cells.get(key)
        return statistics.mean(vals) if vals and key not in res.errors else None

    rec = mean((ratio, "graphprune", "reconstruct"))
    plain = [(f"{lib} {row}", mean((ratio, lib, row))) for lib, rows in
             (("graphprune", GP_ROWS[:5]), ("torch-pruning", TP_ROWS)) for row in rows]
    plain = [(n, v) for n, v in plain if v is not None]
    if rec is None or not plain:
        return ""
    best_name, best = (max if metric == "accuracy" else min)(plain, key=lambda nv: nv[1])
    gain = rec - best if metric == "accuracy" else best - rec
    tie = 5e-4 if metric == "accuracy" else 5e-3 * best
    word = "ties with" if abs(gain) <= tie else "beats" if gain > 0 else "does NOT beat"
    return (f"reconstruct {word} the best plain criterion ({best_name}: {fmt([best], metric)}) "
            f"with {fmt([rec], metric)} (means).")


def render(spec: Spec, res: Results, ratios: list[float]) -> list[str]:
    t = spec.task
    better = "higher" if spec.metric == "accuracy" else "lower"
    lines = [
        f"### {t.name}",
        "",
        f"Unpruned: {spec.metric} {fmt([score(spec, t.model)], spec.metric)} ({better} is better), "
        f"{graphprune.count_params(t.model):,} parameters.",
        "",
    ]
    for ratio in ratios:
        lines += [
            f"**ratio {ratio}**",
            "",
            f"| criterion | graphprune {spec.metric} | params | Torch-Pruning {spec.metric} | params |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in GP_ROWS:
            label = f"**{row}**" if row == "reconstruct" else row
            lines.append(f"| {label} | {cell(res, (ratio, 'graphprune', row), spec.metric)} "
                         f"| {cell(res, (ratio, 'torch-pruning', row), spec.metric)} |")
        lines += ["", verdict(res, ratio, spec.metric), ""]
    timing = []
    for ratio in ratios:
        l2, rc = res.cost.get((ratio, "l2"), []), res.cost.get((ratio, "reconstruct"), [])
        if l2 and rc:
            timing.append(
                f"ratio {ratio}: {statistics.mean(s for s, _ in l2):.1f}s with l2, "
                f"{statistics.mean(s for s, _ in rc):.1f}s with reconstruct=True "
                f"(statistics peak {max(m for _, m in rc):.2f} MiB)"
            )
    if timing:
        lines += ["Cost (wall time of the whole compact call): " + "; ".join(timing) + ".", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,mlp,transformer,lm")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="/work/notes/reconstruction_table.md")
    ap.add_argument("--quick", action="store_true", help="short training, one seed: a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    ratios = [float(r) for r in args.ratios.split(",")]

    def per_sample_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def per_sequence_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    makers = {
        "cnn": lambda q: Spec(make_cnn(q), "accuracy", F.cross_entropy, per_sample_ce),
        "mlp": lambda q: Spec(make_mlp(q), "accuracy", F.cross_entropy, per_sample_ce),
        "transformer": lambda q: Spec(make_transformer(q), "accuracy", F.cross_entropy, per_sample_ce),
        "lm": lambda q: Spec(make_lm(q), "perplexity", lm_loss, per_sequence_ce),
    }
    t_start = time.perf_counter()
    sections: list[str] = []
    for key in args.models.split(","):
        t0 = time.perf_counter()
        spec = makers[key](args.quick)
        print(f"{spec.task.name}: trained in {time.perf_counter() - t0:.0f}s, "
              f"{spec.metric} {score(spec, spec.task.model):.4f}", flush=True)
        res = measure(spec, ratios, seeds, lambda s: print(s, flush=True))
        sections += render(spec, res, ratios)
    import torch_pruning as tp

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    head = [
        "## Accuracy right after pruning (no fine-tuning): graphprune vs Torch-Pruning",
        "",
        f"Generated by `python tools/reconstruction.py {cmd}` "
        f"(torch {torch.__version__}, torch-pruning {getattr(tp, '__version__', '?')}, CPU, 1 thread, "
        f"{time.perf_counter() - t_start:.0f}s on a shared, loaded machine). mean ± std over {seeds} "
        "seeds of the calibration sample (and of the random scores); a single number where nothing is "
        "drawn. \"l2 + refit\" keeps l2's units and only refits; \"reconstruct\" also chooses the units.",
        "",
    ]
    text = "\n".join(head + sections) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
