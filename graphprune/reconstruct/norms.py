"""Norm statistics re-estimated on calibration data after reconstruction.

After units are removed and consumers refit, the activations a BatchNorm sees are no longer
the ones its running statistics describe. One pass over the calibration data in training mode
(the BatchNorm layers normalise with batch statistics, as during training; every other module
stays in eval) measures per-channel sums and sums of squares of every BatchNorm's input
through :class:`~graphprune.reconstruct.moments.SecondMoments` (so a distributed run can
all-reduce them); the running mean and (unbiased) variance are then set from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphprune.planning.calibration import batches, forward, model_device, split_batch, to_device
from graphprune.reconstruct.moments import SecondMoments


def reestimate_batchnorm(model: nn.Module, data: Any, max_batches: int | None = None) -> int:
    """Set every BatchNorm's running statistics from ``data``; returns how many were updated."""
    norms = {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    }
    if not norms:
        return 0
    stats = SecondMoments()
    modes = {p: m.training for p, m in model.named_modules()}

    def hook(path: str):
        def record(mod: nn.Module, args: Any) -> None:
            x = args[0].detach()
            stats.add(path, x.movedim(1, -1).reshape(-1, x.shape[1]), diagonal=True)
        return record

    saved = {p: (m.running_mean.clone(), m.running_var.clone()) for p, m in norms.items()}
    handles = [m.register_forward_pre_hook(hook(p)) for p, m in norms.items()]
    device = model_device(model)
    try:
        for m in norms.values():
            m.train()
        with torch.no_grad():
            for batch in batches(data, "batchnorm re-estimation", max_batches):
                forward(model, split_batch(to_device(batch, device))[0])
        stats.all_reduce()
    except BaseException:
        for p, m in norms.items():
            m.running_mean.copy_(saved[p][0])
            m.running_var.copy_(saved[p][1])
        raise
    finally:
        for h in handles:
            h.remove()
        for p, m in model.named_modules():
            m.training = modes[p]
    with torch.no_grad():
        for p, m in norms.items():
            s = stats[p]
            mean = s.cross / 1.0
            var = (s.gram - mean.pow(2)).clamp_min(0) * (s.n / max(s.n - 1, 1))
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    return len(norms)
