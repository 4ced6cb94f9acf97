"""``graphprune demo``: the whole job, end to end, on a CNN trained in seconds.

Why a trained model rather than random weights: on random weights "accuracy" means nothing, and
the question a user actually has is "what does compaction cost me, and what does it buy me?".
scikit-learn ships the 8x8 handwritten-digits data set (1,797 images) inside the wheel, so the demo
needs no download, trains to >95% test accuracy in a few seconds on two CPU cores, and can show
accuracy before compaction, right after it (no retraining) and after a short fine-tune next to the
measured onnxruntime speed-up.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphprune
from graphprune.errors import GraphPruneError

# Large enough that onnxruntime latency is well above timer noise, small enough to stay quick.
BENCH_BATCH = 64


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head for 1x8x8 digit images.

    Deliberately ordinary (what a user would write) so that compaction has real coupled groups to
    find: each conv's output channels are tied to its BatchNorm and to the next conv's inputs.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.block1 = _conv_bn_relu(1, c1)
        self.block2 = _conv_bn_relu(c1, c2)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.block3 = _conv_bn_relu(c2, c3)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block2(self.block1(x)))
        x = self.block3(x)
        x = x.mean(dim=(2, 3))  # global average pool
        return self.head(x)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@dataclass
class _Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0) -> _Data:
    """Digits as float tensors in [0, 1], shape (N, 1, 8, 8), with a stratified 75/25 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise GraphPruneError(
            "the demo needs scikit-learn for its bundled digits data: pip install 'graphprune[demo]'"
        ) from exc

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return _Data(x_tr, y_tr, x_te, y_te)


def train(
    model: nn.Module,
    data: _Data,
    epochs: int,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    desc: str = "train",
    quiet: bool = True,
) -> nn.Module:
    """Train in place with AdamW and a one-cycle schedule (stable final accuracy in few epochs)."""
    if epochs <= 0:
        return model
    # Compacted models come back from surgery with fresh Parameters; make sure all of them train.
    for p in model.parameters():
        p.requires_grad_(True)
    with _torch_threads(1):
        return _train(model, data, epochs, lr=lr, batch_size=batch_size, seed=seed, desc=desc, quiet=quiet)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting.

    Why one thread: the ops here are tiny (batch 64 of 8x8 maps), so a second thread buys little,
    while on a busy machine (CI, other jobs) OpenMP threads spinning for a core made training 3-5x
    slower in our measurements (9.0 s vs 2.8 s per epoch at load 7 on 2 cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    model: nn.Module, data: _Data, epochs: int, *, lr: float, batch_size: int, seed: int, desc: str,
    quiet: bool,
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data.x_train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data.x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if not quiet:
            acc = accuracy(model, data)
            print(
                f"  {desc} epoch {epoch + 1}/{epochs}: "
                f"loss {total / len(perm):.3f}, test accuracy {acc:.1%}"
            )
    model.eval()
    return model


def accuracy(model: nn.Module, data: _Data) -> float:
    """Top-1 accuracy on the held-out split (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        pred = model(data.x_test).argmax(dim=1)
    return (pred == data.y_test).float().mean().item()


def run_demo(
    ratio: float = 0.5,
    seed: int = 0,
    quiet: bool = False,
    *,
    epochs: int = 8,
    finetune_epochs: int = 3,
    out_dir: str | Path | None = None,
    bench_runs: int | None = None,
) -> dict[str, Any]:
    """Train, compact, fine-tune, export and benchmark a digits CNN; return the figures.

    ``out_dir`` keeps the two ONNX files (``original.onnx``, ``compact.onnx``; a temporary
    directory is used otherwise);
    ``bench_runs`` overrides the number of timed onnxruntime runs (tests use few).
    The returned dict holds accuracies (``acc_before``, ``acc_compacted``, ``acc_finetuned``),
    ``params``/``flops`` as (before, after) pairs, the ``report`` from ``graphprune.benchmark``,
    both models (``model``, ``small``) and the paths of the ONNX files.
    """
    say = (lambda *a: None) if quiet else print
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data = load_digits_data(seed)
    model = DigitsCNN()
    say(f"[1/4] training DigitsCNN on sklearn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images, {epochs} epochs)")
    train(model, data, epochs, seed=seed, desc="train", quiet=quiet)
    acc_before = accuracy(model, data)
    say(f"      trained in {time.perf_counter() - t0:.1f}s: test accuracy {acc_before:.1%}")

    example = data.x_test[:BENCH_BATCH].clone()
    say(f"[2/4] graphprune.compact(model, example, ratio={ratio})")
    t1 = time.perf_counter()
    small = graphprune.compact(model, example, ratio=ratio)
    acc_compacted = accuracy(small, data)
    say(f"      compacted in {time.perf_counter() - t1:.1f}s: "
        f"test accuracy right after compaction {acc_compacted:.1%}")

    say(f"[3/4] fine-tuning the compact model ({finetune_epochs} epochs)")
    # A lower peak learning rate than training: recover, do not relearn from scratch.
    train(small, data, finetune_epochs, lr=1e-3, seed=seed + 1, desc="fine-tune", quiet=quiet)
    acc_finetuned = accuracy(small, data)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(out_dir) if out_dir is not None else Path(tmp)
        say(f"[4/4] exporting both models to ONNX (batch {BENCH_BATCH}), checking them against "
            f"torch in onnxruntime, timing them")
        bench_kwargs = {} if bench_runs is None else {"runs": bench_runs, "warmup": 2}
        report = graphprune.benchmark(model, small, example, workdir=workdir, **bench_kwargs)

    say("")
    say(summary_table(report, acc_before, acc_compacted, acc_finetuned, finetune_epochs))
    say(f"\ntotal time {time.perf_counter() - t0:.1f}s")
    return {
        "ratio": ratio,
        "acc_before": acc_before,
        "acc_compacted": acc_compacted,
        "acc_finetuned": acc_finetuned,
        "params": (report.original_params, report.compact_params),
        "flops": (report.original_flops, report.compact_flops),
        "latency_ms": (report.original_latency.median_ms, report.compact_latency.median_ms),
        "speedup": report.speedup,
        "report": report,
        "model": model,
        "small": small,
        "onnx_paths": (Path(report.original_onnx), Path(report.compact_onnx)) if out_dir else None,
    }


def summary_table(
    report: Any, acc_before: float, acc_compacted: float, acc_finetuned: float, ft_epochs: int
) -> str:
    """One before/after table: size, cost, measured latency and accuracy side by side."""

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    o, c = report.original_latency, report.compact_latency
    rows = [
        ("", "original", "compact", "compact/original"),
        ("params", f"{report.original_params:,}", f"{report.compact_params:,}",
         ratio(report.compact_params, report.original_params)),
        (f"FLOPs (batch {BENCH_BATCH})", f"{report.original_flops:,}", f"{report.compact_flops:,}",
         ratio(report.compact_flops, report.original_flops)),
        ("onnxruntime latency (ms)", f"{o.median_ms:.3f}", f"{c.median_ms:.3f}",
         ratio(c.median_ms, o.median_ms)),
        ("test accuracy", f"{acc_before:.1%}", "", ""),
        ("  right after compaction", "", f"{acc_compacted:.1%}", ""),
        (f"  after {ft_epochs}-epoch fine-tune", "", f"{acc_finetuned:.1%}",
         f"{(acc_finetuned - acc_before) * 100:+.1f} pts"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                  for i, cell in enumerate(r)).rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    ideal = "n/a" if report.ideal_speedup is None else f"{report.ideal_speedup:.2f}x"
    lines.append("")
    lines.append(
        f"speed-up {report.speedup:.2f}x measured in onnxruntime (median of {o.runs} interleaved "
        f"runs, {o.threads} threads; ideal from FLOPs {ideal})"
    )
    return "\n".join(lines)
