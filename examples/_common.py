"""What the examples share: their command line, and saving a compact model and loading it back.

Not an example itself (tests/test_examples.py skips files that start with ``_``): each script in
this folder does ``import _common``, which works from any directory because Python puts a
script's own folder first on ``sys.path`` (``python examples/vit.py``). The graphprune calls an
example is about (compact, export_onnx, benchmark) stay in the example.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphprune


def parse_args(
    doc: str, *, ratio: float = 0.3, prune_hidden: bool = False, attention: bool = False
) -> argparse.Namespace:
    """``--tiny`` (smoke-test sizes: what the tests run) and ``--ratio``; ``doc``'s first line says what."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and input (smoke test)")
    parser.add_argument("--ratio", type=float, default=ratio)
    if prune_hidden:
        parser.add_argument("--prune-hidden", action="store_true", help="also shrink the hidden size")
    if attention:
        parser.add_argument("--attention", choices=("heads", "q_heads", "head_dim"), default="heads",
                            help="whole heads / KV groups (default), q heads within KV groups, or "
                                 "channels inside every head")
    return parser.parse_args()


def save_and_reload(
    model: nn.Module, small: nn.Module, plan: graphprune.Plan, directory: Path
) -> tuple[nn.Module, str]:
    """Save a compact Hugging Face model and load it back: ``(reloaded model, how)``.

    ``save_pretrained`` / ``from_pretrained`` when graphprune could write the new widths into
    ``small.config`` (the plan's notes say so). Otherwise the config class cannot describe them
    (BERT derives the head width from ``hidden_size / num_attention_heads``; LLaMA wants
    ``hidden_size % heads == 0``): ``graphprune.save`` writes the weights and the plan, and
    ``graphprune.load`` replays the plan on a freshly built model of the original config (whose
    weights do not matter).
    """
    if any(note.startswith("model.config updated") for note in plan.notes):
        small.save_pretrained(directory)
        return type(small).from_pretrained(directory).eval(), "save_pretrained -> from_pretrained"
    graphprune.save(small, directory, plan)
    base = type(model)(model.config)  # the original architecture
    return graphprune.load(directory, base).eval(), "graphprune.save -> graphprune.load"


def _logits(model: nn.Module, example_input: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**example_input) if isinstance(example_input, dict) else model(example_input)
    return out.logits


def check_reload(
    model: nn.Module, small: nn.Module, plan: graphprune.Plan, example_input: Any, directory: Path
) -> None:
    """``save_and_reload`` and demand the same weights and logits; exit with an error otherwise."""
    again, how = save_and_reload(model, small, plan, directory)
    # Same tensors bit for bit; outputs equal up to float rounding (safetensors' memory-mapped
    # weights are aligned differently, which can change the order of a BLAS kernel's sums).
    pairs = zip(again.state_dict().values(), small.state_dict().values())
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    logits, expected = _logits(again, example_input), _logits(small, example_input)
    same = same_weights and torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    print(f"{how}: identical weights and logits: {same}")
    if not same:
        raise SystemExit("reloaded model differs")
