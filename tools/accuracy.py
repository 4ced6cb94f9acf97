"""Accuracy benchmark: which units each criterion removes, and how much accuracy comes back.

    python tools/accuracy.py [--ratios 0.3,0.5] [--recover-steps 150] [--models cnn,transformer]
                             [--out /work/notes/accuracy_table.md] [--quick]

Two models are trained to convergence in the run (no download):

* ``cnn``: graphprune.cli.demo's DigitsCNN (three conv-BN-ReLU blocks) on scikit-learn's 8x8 digits;
* ``transformer``: a 2-block pre-LN transformer classifier (width 32, 4 heads of 8, MLP 64) on
  a synthetic *pointer* task: the first token says which position to read and the class is the
  token found there (16 classes), so attention is required (pooled embeddings alone are at chance).
  Small on purpose: a model with capacity to spare loses nothing at any ratio with any criterion,
  which would say nothing about the criteria.

For every ratio and criterion the trained model is compacted by graphprune and pruned by
Torch-Pruning (TP 1.6) with its corresponding importance, both from the same trained weights in
the same process. The table shows test accuracy right after pruning and after ``N`` steps of
the same recovery for both (``graphprune.recover``: KL distillation from the unpruned model,
Adam 1e-3, batch 64), plus the parameter count so that a pruner that quietly skipped groups is
visible. TP is driven as its README/examples show: ``ignored_layers`` = the classifier (and, for
the transformer, the layers writing the residual stream, which graphprune also keeps by default);
heads via ``num_heads`` + ``prune_num_heads=True``; Taylor after ``loss.backward()`` over the
calibration batches; Hessian by its documented per-sample ``accumulate_grad`` loop; activation
under ``compute_importance``. Calibration data (data-driven criteria, both libraries): 4 batches
of 64 training samples.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphprune  # noqa: E402
from graphprune.cli.demo import DigitsCNN, load_digits_data  # noqa: E402
from graphprune.cli.demo import train as train_digits  # noqa: E402
from graphprune.methods.recover import evaluate_distillation  # noqa: E402

CRITERIA = ["l1", "l2", "random", "fpgm", "taylor", "bn_scale", "activation", "apoz", "hessian", "lamp"]
DATA_DRIVEN = {"taylor", "hessian", "activation", "apoz"}


# ------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PointerTransformer(nn.Module):
    def __init__(
        self,
        vocab: int = 16,
        seq: int = 12,
        dim: int = 32,
        heads: int = 4,
        hidden: int = 64,
        depth: int = 2,
        classes: int = 16,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


@dataclass
class Task:
    name: str
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    example: torch.Tensor
    tp_ignored: Callable[[nn.Module], list[nn.Module]]
    tp_heads: Callable[[nn.Module], dict[nn.Module, int]] = lambda m: {}
    notes: list[str] = field(default_factory=list)


def pointer_data(n: int, seed: int, seq: int = 12, vocab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq), generator=g)
    tokens[:, 0] = torch.randint(1, seq, (n,), generator=g)  # the pointer
    y = tokens[torch.arange(n), tokens[:, 0]]
    return tokens, y


def train_generic(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * -(-len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def make_cnn(quick: bool) -> Task:
    torch.manual_seed(0)
    data = load_digits_data(0)
    model = DigitsCNN()
    train_digits(model, data, 4 if quick else 15, seed=0)
    return Task(
        "cnn (DigitsCNN on sklearn digits)",
        model,
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        data.x_test[:8].clone(),
        lambda m: [m.head],
    )


def make_transformer(quick: bool) -> Task:
    torch.manual_seed(0)
    x_tr, y_tr = pointer_data(12000, 1)
    x_te, y_te = pointer_data(2000, 2)
    model = PointerTransformer()
    train_generic(model, x_tr, y_tr, 6 if quick else 20, 3e-3, 0)

    def ignored(m: nn.Module) -> list[nn.Module]:
        return [m.head] + [b.attn.proj for b in m.blocks] + [b.fc2 for b in m.blocks]

    def heads(m: nn.Module) -> dict[nn.Module, int]:
        return {lin: b.attn.num_heads for b in m.blocks for lin in (b.attn.q, b.attn.k, b.attn.v)}

    return Task(
        "transformer (pointer task, 2 blocks, 4 heads of 8, MLP 64)",
        model,
        x_tr,
        y_tr,
        x_te,
        y_te,
        x_te[:8].clone(),
        ignored,
        heads,
    )


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of shuffled training batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - size + 1, size):
            idx = perm[i : i + size]
            yield x[idx], y[idx]


class Stream:
    """Re-iterable view of the first ``n`` batches of a seeded stream (for recover())."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, seed: int, n: int) -> None:
        self.x, self.y, self.size, self.seed, self.n = x, y, size, seed, n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = batches(self.x, self.y, self.size, self.seed)
        for _ in range(self.n):
            yield next(it)


# ------------------------------------------------------------------------------------------
# Torch-Pruning side
# ------------------------------------------------------------------------------------------

TP_NAMES = {
    "l1": "GroupMagnitudeImportance(p=1)",
    "l2": "GroupMagnitudeImportance(p=2)",
    "random": "RandomImportance",
    "fpgm": "FPGMImportance",
    "taylor": "GroupTaylorImportance",
    "bn_scale": "BNScaleImportance",
    "activation": "ActivationImportance",
    "hessian": "GroupHessianImportance",
    "lamp": "LAMPImportance",
}


def tp_prune(
    task: Task,
    name: str,
    ratio: float,
    calib: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """TP with criterion ``name``; ``loss_fn(out, y)`` for Taylor, ``per_sample(out, y)`` (one loss
    per sample, default cross-entropy) for its per-sample Hessian loop."""
    import torch_pruning as tp

    if per_sample is None:

        def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, y, reduction="none")

    imp = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "random": tp.importance.RandomImportance,
        "fpgm": tp.importance.FPGMImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "bn_scale": tp.importance.BNScaleImportance,
        "activation": tp.importance.ActivationImportance,
        "hessian": tp.importance.GroupHessianImportance,
        "lamp": tp.importance.LAMPImportance,
    }[name]()
    model = copy.deepcopy(task.model).eval()
    heads = task.tp_heads(model)
    kwargs: dict[str, Any] = {}
    if heads:
        kwargs = {
            "num_heads": heads,
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": ratio,
        }
    pruner = tp.pruner.MetaPruner(
        model,
        (task.example,),
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=task.tp_ignored(model),
        **kwargs,
    )
    if name == "taylor":
        model.zero_grad()
        for x, y in calib:
            loss_fn(model(x), y).backward()
    elif name == "hessian":
        imp.zero_grad()
        n = 0
        for x, y in calib:
            for loss in per_sample(model(x), y):
                if n >= 128:
                    break
                model.zero_grad()
                loss.backward(retain_graph=True)
                imp.accumulate_grad(model)
                n += 1
    if name == "activation":
        with imp.compute_importance(model), torch.no_grad():
            for x, _ in calib:
                model(x)
    pruner.step()
    model.zero_grad(set_to_none=True)
    for blk in getattr(model, "blocks", []):  # what TP's transformer examples patch by hand
        blk.attn.num_heads = blk.attn.q.out_features // blk.attn.head_dim
    return model


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


@dataclass
class Cell:
    acc: float | None = None
    kl: float | None = None  # distillation loss vs the unpruned model on the test set, right after
    acc_early: float | None = None
    acc_recovered: float | None = None
    params: int | None = None
    error: str | None = None


EARLY = 10  # first recovery checkpoint (steps); the second is --recover-steps


def recover_and_score(task: Task, small: nn.Module, steps: int) -> tuple[float, float]:
    """Accuracy after EARLY and after ``steps`` distillation steps (one optimizer, one data stream)."""
    torch.manual_seed(0)
    for p in small.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(small.parameters(), lr=1e-3)
    stream = iter(Stream(task.x_train, task.y_train, 64, 3, max(steps, 1)))
    early = min(EARLY, steps)
    graphprune.recover(
        small, task.model, [next(stream) for _ in range(early)], steps=early, optimizer=opt, progress=False
    )
    a1 = accuracy(small, task.x_test, task.y_test)
    graphprune.recover(small, task.model, list(stream), steps=steps - early, optimizer=opt, progress=False)
    return a1, accuracy(small, task.x_test, task.y_test)


def graphprune_prune(task: Task, name: str, ratio: float, calib: list[Any]) -> nn.Module:
    """graphprune with Torch-Pruning's widths: every group keeps floor(units * (1 - ratio)).

    ``compact(ratio)`` itself keeps ``units - round(ratio * units)`` (at most one unit more per
    group); the benchmark uses TP's rounding so that both sides have the same widths and only the
    choice of units differs.
    """
    from graphprune.engine import prepare, realize
    from graphprune.planning.plan import build_plan

    kw = {"data": calib, "loss_fn": F.cross_entropy} if name in DATA_DRIVEN else {}
    analysis, crit = prepare(task.model, task.example, name, (), **kw)
    counts = {
        g.index: g.num_units - max(1, int(g.num_units * (1 - ratio) + 1e-9))
        for g in analysis.groups
        if g.members and g.num_units > 1
    }
    plan = build_plan(analysis, ratio, crit, name, counts=counts)
    return realize(analysis, plan, task.example)[0]


def run_task(
    task: Task, ratios: list[float], steps: int, log: Callable[[str], None]
) -> dict[tuple[float, str, str], Cell]:
    calib = list(Stream(task.x_train, task.y_train, 64, 11, 4))
    out: dict[tuple[float, str, str], Cell] = {}
    for ratio in ratios:
        for name in CRITERIA:
            for lib in ("graphprune", "torch-pruning"):
                cell = Cell()
                t0 = time.perf_counter()
                if lib == "torch-pruning" and name not in TP_NAMES:
                    cell.error = "no such criterion"
                    out[(ratio, name, lib)] = cell
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if lib == "graphprune":
                            small = graphprune_prune(task, name, ratio, calib)
                        else:
                            small = tp_prune(task, name, ratio, calib)
                    cell.params = graphprune.count_params(small)
                    cell.acc = accuracy(small, task.x_test, task.y_test)
                    cell.kl = evaluate_distillation(
                        small, task.model, [(task.x_test, task.y_test)], loss="kl", temperature=1.0
                    )
                    cell.acc_early, cell.acc_recovered = recover_and_score(task, small, steps)
                except Exception as exc:  # noqa: BLE001 - a failure is a result of the benchmark
                    cell.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                out[(ratio, name, lib)] = cell
                log(f"  ratio {ratio} {name:<10} {lib:<13} {fmt(cell)}  ({time.perf_counter() - t0:.1f}s)")
    return out


def fmt(cell: Cell) -> str:
    if cell.error:
        return f"failed ({cell.error})"
    return f"{cell.acc:.1%} -> {cell.acc_early:.1%} -> {cell.acc_recovered:.1%}, {cell.params:,} params"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def table(
    task: Task,
    results: dict[tuple[float, str, str], Cell],
    ratios: list[float],
    steps: int,
    base_acc: float,
    base_params: int,
) -> str:
    lines = [
        f"### {task.name}",
        "",
        f"Unpruned: test accuracy {base_acc:.1%}, {base_params:,} parameters. "
        f'"+N steps": after N steps of distillation from the unpruned model (graphprune.recover, '
        "batch 64, Adam 1e-3; the same for both libraries). Both keep floor(units x (1 - ratio)) "
        "units per group (TP's rounding), so only the choice of units differs. KL: KL divergence "
        "from the unpruned model's predictions on the test set right after pruning (lower = closer; "
        "less noisy than accuracy once a network has collapsed).",
        "",
    ]
    for ratio in ratios:
        lines += [
            f"**ratio {ratio}**",
            "",
            f"| criterion | graphprune: pruned | KL | +{EARLY} steps | +{steps} steps | params "
            f"| Torch-Pruning: pruned | KL | +{EARLY} steps | +{steps} steps | params |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in CRITERIA:
            g, t = results[(ratio, name, "graphprune")], results[(ratio, name, "torch-pruning")]

            def cols(c: Cell) -> str:
                if c.error:
                    return f"{c.error} | | | | "
                kl = f"{c.kl:.2f}" if c.kl is not None else "—"
                return f"{pct(c.acc)} | {kl} | {pct(c.acc_early)} | {pct(c.acc_recovered)} | {c.params:,}"

            tp_label = f" / {TP_NAMES[name]}" if name in TP_NAMES else ""
            lines.append(f"| {name}{tp_label} | {cols(g)} | {cols(t)} |")
        lines.append("")
    lines.extend(f"- {n}" for n in task.notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--recover-steps", type=int, default=150)
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--out", default="/work/notes/accuracy_table.md")
    ap.add_argument("--quick", action="store_true", help="short training, for a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny ops: one thread is faster and steadier on a shared 2-core machine
    ratios = [float(r) for r in args.ratios.split(",")]
    makers = {"cnn": make_cnn, "transformer": make_transformer}
    t_start = time.perf_counter()
    sections = []
    for key in args.models.split(","):
        t0 = time.perf_counter()
        task = makers[key](args.quick)
        base_acc = accuracy(task.model, task.x_test, task.y_test)
        base_params = graphprune.count_params(task.model)
        print(
            f"{task.name}: trained in {time.perf_counter() - t0:.0f}s, test accuracy {base_acc:.1%}",
            flush=True,
        )
        results = run_task(task, ratios, args.recover_steps, lambda s: print(s, flush=True))
        sections.append(table(task, results, ratios, args.recover_steps, base_acc, base_params))
    import torch_pruning as tp

    head = [
        "## Accuracy after pruning: graphprune criteria vs Torch-Pruning",
        "",
        f"Generated by `python tools/accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(torch {torch.__version__}, torch-pruning {getattr(tp, '__version__', '?')}, CPU, "
        f"{time.perf_counter() - t_start:.0f}s). Same trained weights, same calibration batches and the "
        'same recovery for both libraries in one process. "params" shows how much each pruner really '
        "removed (a pruner that skips groups looks accurate but is not smaller).",
        "",
    ]
    text = "\n".join(head + sections) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
