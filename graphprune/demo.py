"""``graphprune demo``: the whole job, end to end, on a CNN trained in seconds.

Why a trained model rather than random weights: on random weights "accuracy" means nothing, and
the question a user actually has is "what does compaction cost me, and what does it buy me?".
scikit-learn ships the 8x8 handwritten-digits data set (1,797 images) inside the wheel, so the demo
needs no download, trains to >95% test accuracy in a few seconds on two CPU cores, and can show
accuracy before compaction, right after it (no retraining) and after a short fine-tune next to the
measured onnxruntime speed-up.
"""

from __future__ import annotations

import tempfile
import time
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

    ``out_dir`` keeps the two ONNX files (a temporary directory is used otherwise);
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
    say(f"[1/5] training DigitsCNN on sklearn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images, {epochs} epochs)")
    train(model, data, epochs, seed=seed, desc="train", quiet=quiet)
    acc_before = accuracy(model, data)
    say(f"      trained in {time.perf_counter() - t0:.1f}s: test accuracy {acc_before:.1%}")

    example = data.x_test[:BENCH_BATCH].clone()
    say(f"[2/5] graphprune.compact(model, example, ratio={ratio})")
    t1 = time.perf_counter()
    small = graphprune.compact(model, example, ratio=ratio)
    acc_compacted = accuracy(small, data)
    say(f"      compacted in {time.perf_counter() - t1:.1f}s: "
        f"test accuracy right after compaction {acc_compacted:.1%}")

    say(f"[3/5] fine-tuning the compact model ({finetune_epochs} epochs)")
    # A lower peak learning rate than training: recover, do not relearn from scratch.
    train(small, data, finetune_epochs, lr=1e-3, seed=seed + 1, desc="fine-tune", quiet=quiet)
    acc_finetuned = accuracy(small, data)

    params = (graphprune.count_params(model), graphprune.count_params(small))
    flops = (graphprune.count_flops(model, example), graphprune.count_flops(small, example))

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp)
        target.mkdir(parents=True, exist_ok=True)
        onnx_paths = (target / "digits_cnn.onnx", target / "digits_cnn_small.onnx")
        say(f"[4/5] exporting both models to ONNX (batch {BENCH_BATCH}) and checking them "
            f"in onnxruntime")
        graphprune.export_onnx(model, example, onnx_paths[0])
        graphprune.export_onnx(small, example, onnx_paths[1])

        say("[5/5] measuring onnxruntime latency of both models")
        bench_kwargs = {} if bench_runs is None else {"runs": bench_runs, "warmup": 2}
        report = graphprune.benchmark(model, small, example, **bench_kwargs)

    say("")
    say(str(report))
    say("")
    say(_accuracy_table(acc_before, acc_compacted, acc_finetuned, finetune_epochs))
    say(f"\ntotal time {time.perf_counter() - t0:.1f}s")
    return {
        "ratio": ratio,
        "acc_before": acc_before,
        "acc_compacted": acc_compacted,
        "acc_finetuned": acc_finetuned,
        "params": params,
        "flops": flops,
        "report": report,
        "model": model,
        "small": small,
        "onnx_paths": onnx_paths if out_dir is not None else None,
    }


def _accuracy_table(before: float, compacted: float, finetuned: float, ft_epochs: int) -> str:
    rows = [
        ("original", before),
        ("compact, no retraining", compacted),
        (f"compact + {ft_epochs}-epoch fine-tune", finetuned),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'digits test accuracy':<{width}}  ", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {acc:>7.1%}" for name, acc in rows]
    return "\n".join(lines)
