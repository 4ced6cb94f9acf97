"""``--calib FILE`` and ``--reconstruct``: calibration data from the command line.

A shell user has no DataLoader, so the calibration set is a file of model inputs: a
``torch.save``'d tensor (its first dimension is the sample axis, cut into batches of
``--calib-batch``), a list of such tensors (used as the batches), or a ``.npy`` array. The
file is read with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import InputError


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="FILE",
                   help="calibration inputs: a torch.save'd tensor (samples first) or list of batches, "
                        "or a .npy array; no labels needed")
    p.add_argument("--calib-batch", type=int, default=32, metavar="N",
                   help="batch size when --calib is one tensor (default 32)")
    p.add_argument("--reconstruct", action="store_true",
                   help="choose units by the reconstruction error of the layers that read them and "
                        "refit those layers by least squares on --calib (no training)")


def load_calibration(path: str, batch: int) -> list[Any]:
    """The batches in ``path`` (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--calib {path}: no such file")
    if batch < 1:
        raise InputError(f"--calib-batch must be >= 1, got {batch}")
    try:
        if file.suffix == ".npy":
            import numpy as np

            obj: Any = torch.from_numpy(np.load(file, allow_pickle=False))
        else:
            obj = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InputError(
            f"--calib {path} could not be read ({type(exc).__name__}: {exc}); save a tensor of inputs "
            "with torch.save(x, path) or numpy.save"
        ) from exc
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise InputError(f"--calib {path} holds a scalar; save a tensor whose first dim is samples")
        return list(obj.split(batch))
    if isinstance(obj, (list, tuple)) and obj:
        return list(obj)
    raise InputError(f"--calib {path} must hold a tensor or a non-empty list of batches, "
                     f"got {type(obj).__name__}")


def calibration_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``data=`` / ``reconstruct=`` for the API from the parsed flags."""
    calib = getattr(args, "calib", None)
    reconstruct = bool(getattr(args, "reconstruct", False))
    if reconstruct and not calib:
        raise InputError("--reconstruct needs calibration inputs: add --calib FILE")
    if not calib:
        return {}
    out: dict[str, Any] = {"data": load_calibration(calib, getattr(args, "calib_batch", 32))}
    if reconstruct:
        out["reconstruct"] = True
    return out
