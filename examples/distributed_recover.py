"""Prune and recover on several processes: plan on every rank, compact, distil data-parallel, save once.

    torchrun --nproc_per_node=2 examples/distributed_recover.py --tiny      # one node, 2 processes
    torchrun --nproc_per_node=8 examples/distributed_recover.py             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/distributed_recover.py   # node 0 of 2
    python examples/distributed_recover.py --tiny                           # no torchrun: one process

Every rank reads its own shard of the calibration and training data (a DistributedSampler);
graphprune all-reduces the Taylor statistics, so all ranks compute the same plan, the one a
single process would make on all the shards together. ``recover`` then trains with DDP
(``--strategy fsdp`` shards the student instead) and rank 0 alone writes the result. NCCL is
used when the processes have GPUs, gloo otherwise. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import graphprune
from graphprune import distributed


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank (graphprune checks)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def loader(n: int, size: int, batch: int, seed: int) -> DataLoader:
    """A synthetic labelled image set, split over the ranks by a DistributedSampler."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    sampler = DistributedSampler(data, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=False) if distributed.is_distributed() else None
    return DataLoader(data, batch_size=batch, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and data (smoke test)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    width, size, n, steps = (8, 8, 32, 4) if args.tiny else (64, 32, 2048, 200)

    model = make_model(width).to(device or "cpu").eval()
    torch.manual_seed(1)
    example = torch.randn(2, 3, size, size, device=device)
    calib = loader(n, size, 8, seed=1)  # this rank's shard
    train = loader(n, size, 8, seed=2)

    # 1. plan on every rank: the Taylor statistics are summed over all ranks' shards first
    plan = graphprune.make_plan(model, example, args.ratio, importance="taylor",
                                data=[(x.to(example.device), y.to(example.device)) for x, y in calib],
                                loss_fn=F.cross_entropy)
    # 2. compact: the same plan everywhere, so the same student everywhere
    student = graphprune.apply_plan(model, plan)
    # 3. recover: each rank distils on its own shard; gradients are averaged (DDP) or sharded (FSDP)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "recover.pt"
        graphprune.recover(student, model, train, steps=steps, lr=1e-3,
                           strategy=args.strategy if distributed.is_distributed() else None,
                           checkpoint=ckpt, checkpoint_every=max(1, steps // 2),
                           progress=not args.tiny)
        # 4. save once: rank 0 writes; the others wait so that nobody reads a half-written file
        if distributed.is_main():
            graphprune.save(student, Path(tmp) / "small", plan)
            kept = graphprune.count_params(student) / graphprune.count_params(model)
            print(f"ranks: {distributed.world_size()}, parameters kept: {kept:.0%}, checkpoint at step "
                  f"{torch.load(ckpt)['step']}, wrote {sorted(os.listdir(tmp))}")
        distributed.barrier()
    # every rank holds the same weights (graphprune.distributed.fingerprint compares them)
    distributed.agree(distributed.fingerprint(student), "the recovered student")
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
