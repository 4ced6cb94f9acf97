"""Second-moment statistics of calibration activations: the only thing reconstruction keeps.

Least squares needs ``X^T X`` (inputs of the compacted model), ``X^T Y`` (those inputs against
the original model's inputs at the same layer) and means; never the activations themselves, so
the calibration set is streamed and memory is one layer's ``d x d`` matrices, whatever the
number of samples. Norm re-estimation needs per-channel sums and sums of squares.

Everything is kept as plain **sums plus a sample count** (float64), never as running means:
sums from several processes or shards add up exactly, which is what :meth:`SecondMoments.merge`
and :meth:`SecondMoments.all_reduce` (``torch.distributed``) rely on. Every data statistic of
this package goes through this one class, so a distributed run needs one all-reduce point.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from graphprune.distributed import all_reduce_sum
from graphprune.errors import InputError


@dataclass
class Moments:
    """Sums for one key: ``xx = sum x x^T``, ``xy = sum x y^T`` (or per-channel sums), ``n`` rows."""

    xx: torch.Tensor
    xy: torch.Tensor | None
    n: int
    diagonal: bool = False

    @property
    def gram(self) -> torch.Tensor:
        """Mean of x x^T (or of x^2 per channel)."""
        return self.xx / max(self.n, 1)

    @property
    def cross(self) -> torch.Tensor:
        """Mean of x y^T (or of x per channel when diagonal)."""
        if self.xy is None:
            raise InputError("these moments were accumulated without a second input")
        return self.xy / max(self.n, 1)


class SecondMoments:
    """Accumulate ``sum x x^T`` and ``sum x y^T`` (or per-channel ``sum x``, ``sum x^2``) by key.

    ``add(key, x, y)`` takes row matrices ``(samples, features)``; ``x`` and ``y`` must have the
    same rows (the same samples seen by two models). ``add(key, x, diagonal=True)`` keeps only
    per-channel sums (``xy`` = sum x, ``xx`` = sum x^2), for norm statistics. Non-finite
    activations are refused with the key that produced them.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.stats: dict[Hashable, Moments] = {}

    def add(
        self, key: Hashable, x: torch.Tensor, y: torch.Tensor | None = None, *, diagonal: bool = False
    ) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        if y is not None:
            y = y.detach().reshape(-1, y.shape[-1]).to(self.dtype)
            if y.shape[0] != x.shape[0]:
                raise InputError(f"{key}: {x.shape[0]} rows against {y.shape[0]}; the two runs differ")
        for t in (x,) if y is None else (x, y):
            if not torch.isfinite(t).all():
                raise InputError(
                    f"calibration activations entering {key} are not finite (NaN or inf): check the "
                    "calibration data (normalisation, dtype) before reconstructing."
                )
        if diagonal:
            xx, xy = x.pow(2).sum(0), x.sum(0)
        else:
            xx = x.T @ x
            xy = None if y is None else x.T @ y
        old = self.stats.get(key)
        if old is None:
            self.stats[key] = Moments(xx, xy, x.shape[0], diagonal)
        else:
            old.xx += xx
            if xy is not None:
                old.xy = xy if old.xy is None else old.xy + xy
            old.n += x.shape[0]

    def __getitem__(self, key: Hashable) -> Moments:
        return self.stats[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self.stats

    @property
    def nbytes(self) -> int:
        """Memory held by the sums (what one group's statistics cost)."""
        tensors = [t for m in self.stats.values() for t in (m.xx, m.xy) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def merge(self, other: SecondMoments) -> None:
        """Add another accumulator's sums (e.g. from another shard of the calibration data)."""
        for key, m in other.stats.items():
            old = self.stats.get(key)
            if old is None:
                xy = None if m.xy is None else m.xy.clone()
                self.stats[key] = Moments(m.xx.clone(), xy, m.n, m.diagonal)
            else:
                old.xx += m.xx
                if m.xy is not None:
                    old.xy = m.xy.clone() if old.xy is None else old.xy + m.xy
                old.n += m.n

    def all_reduce(self) -> None:
        """Sum the statistics over every ``torch.distributed`` rank (no-op when not initialised).

        Every rank must have accumulated the same keys (the same model on its own shard of the
        calibration data); keys are reduced in sorted order, and graphprune.distributed checks
        that every rank sends the same shapes (a clear DistributedError instead of a hang).
        """
        keys = sorted(self.stats, key=repr)
        flat: list[torch.Tensor] = []
        for key in keys:
            m = self.stats[key]
            flat += [m.xx, *([m.xy] if m.xy is not None else []),
                     torch.tensor([m.n], dtype=torch.float64, device=m.xx.device)]
        summed = iter(all_reduce_sum(flat, "reconstruction statistics"))
        for key in keys:
            m = self.stats[key]
            m.xx = next(summed)
            if m.xy is not None:
                m.xy = next(summed)
            m.n = int(round(float(next(summed).item())))
