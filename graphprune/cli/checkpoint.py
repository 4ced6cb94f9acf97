"""``graphprune checkpoint SRC DST``: compact a Hugging Face checkpoint folder shard by shard.

Kept apart from ``graphprune/cli/commands.py`` (which registers it with one call): the command
never loads the model, so it takes no MODEL argument and no example input, only folders.
"""

from __future__ import annotations

import argparse
import time

import graphprune
from graphprune.cli.calib import calibration_kwargs


def cmd_checkpoint(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    result = graphprune.compact_checkpoint(
        args.src, args.dst, args.ratio, importance=args.importance, ignored_layers=tuple(args.ignore),
        prune_hidden=args.prune_hidden, attention=args.attention, progress=not args.quiet,
        **calibration_kwargs(args),
    )
    if not args.quiet:
        print(result.plan)
        print()
    print(result)
    print(f"compacted in {time.perf_counter() - t0:.1f}s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from graphprune.cli.calib import add_calibration_args
    from graphprune.cli.common import add_structure_args, ratio_arg

    p = sub.add_parser(
        "checkpoint",
        help="compact a Hugging Face checkpoint folder shard by shard (never loads the model)",
        description="Compact the safetensors checkpoint in SRC (config.json + shards + index) into "
                    "DST with the same shard layout: planned on the meta device, scored and sliced "
                    "one shard at a time, written to a temporary folder and renamed at the end.",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder")
    p.add_argument("dst", metavar="DST", help="new folder for the compact checkpoint (must not exist)")
    p.add_argument("--ratio", type=ratio_arg, default=0.3,
                   help="fraction of the units of every prunable group to remove (default 0.3)")
    p.add_argument("--importance", choices=("l1", "l2", "activation", "apoz"), default=None,
                   help="l1/l2: weight magnitude (default l2; with --calib only the count per group, "
                        "reconstruction chooses the units); activation/apoz: measured on --calib block "
                        "by block, no reconstruction")
    add_structure_args(p)
    add_calibration_args(p)  # --calib FILE: token ids; reconstructs block by block (docs/llm.md)
    p.add_argument("--quiet", action="store_true", help="no plan, no progress bars")
    p.set_defaults(func=cmd_checkpoint)
