"""Which units to remove, and the refit that goes with it: greedy structured OBS on least squares.

For one consumer ``y = W x + b`` the target is the original model's output ``y_o = W_o x_o + b_o``
(original weights on the original model's input), the regressors are the compacted model's
inputs ``x`` with a constant column for the bias. With ``H = E[x x^T] + lambda I`` and
``C = E[x x_o^T] [W_o b_o]^T`` (both from :class:`~graphprune.reconstruct.moments.SecondMoments`)
the ridge least-squares weights on a set of live columns are ``W* = H^-1 C``.

Removing a unit removes its columns ``S``. The least-squares error then grows by

    dE(S) = tr( W*_S^T  [(H^-1)_SS]^-1  W*_S )

and the remaining weights move by ``-(H^-1)_{:,S} [(H^-1)_SS]^-1 W*_S`` (Optimal Brain Surgeon
for a quadratic objective, as in structured OBS / SlimGPT / ZipLM): exact, not an
approximation, so after the greedy removal ``W*`` *is* the ridge refit of the kept columns,
bias compensation for the removed units' mean included (the constant column absorbs it).
Units are removed one at a time, the cheapest first, with ``H^-1`` downdated after each.

A group may feed several consumers; their errors are added after dividing each by the energy
of its own reconstruction (``tr(W*^T H W*)``), so a wide layer cannot drown a narrow one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from graphprune.graph.arrays import distinct


@dataclass
class Problem:
    """One consumer's least-squares problem restricted to its live columns."""

    col_unit: np.ndarray  # per live row of hinv: unit index of the group, -1 if not a candidate
    hinv: torch.Tensor  # (L, L) inverse of the damped Gram matrix
    w: torch.Tensor  # (L, out) current solution
    energy: float
    live: np.ndarray  # indices of the live columns in the consumer's augmented column space
    cols_of: dict[int, np.ndarray] = field(default_factory=dict)


def make_problem(
    gram: torch.Tensor,
    cross: torch.Tensor,
    w_orig: torch.Tensor,
    col_unit: np.ndarray,
    live: np.ndarray,
    ridge: float,
) -> Problem:
    """Build the problem on the ``live`` columns (augmented space: last column is the constant).

    ``gram`` = E[x x^T] and ``cross`` = E[x x_o^T] in the augmented column space,
    ``w_orig`` = [W_o b_o] (out, columns + 1).
    """
    live_t = torch.as_tensor(live, dtype=torch.long, device=gram.device)
    h = gram[live_t][:, live_t]
    c = cross[live_t] @ w_orig.T.to(cross.device, cross.dtype)
    diag = torch.diagonal(h)
    damp = ridge * float(diag.mean()) if diag.numel() else 0.0
    h = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * max(damp, 1e-12)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    except RuntimeError:
        hinv = torch.linalg.pinv(h, hermitian=True)
    w = hinv @ c
    energy = float((w * (h @ w)).sum())
    units = col_unit[live]
    cols_of = {int(u): np.flatnonzero(units == u) for u in distinct(units[units >= 0])}
    return Problem(units, hinv, w, max(energy, 1e-30), live, cols_of)


def _unit_errors(p: Problem, units: list[int]) -> np.ndarray:
    """dE of removing each unit alone (0 where the unit has no live column here)."""
    out = np.zeros(len(units))
    by_size: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        cols = p.cols_of.get(u)
        if cols is not None and cols.size:
            by_size.setdefault(cols.size, []).append(i)
    for idxs in by_size.values():
        cols = np.stack([p.cols_of[units[i]] for i in idxs])
        idx = torch.as_tensor(cols, dtype=torch.long, device=p.w.device)  # (n, s)
        block = p.hinv[idx[:, :, None], idx[:, None, :]]  # (n, s, s)
        wu = p.w[idx]  # (n, s, out)
        if cols.shape[1] == 1:  # one column per unit (Linear): a division, not a batched solve,
            sol = wu / block  # which on a loaded CPU costs ~1000x more in thread start-up
        else:
            try:
                sol = torch.linalg.solve(block, wu)
            except RuntimeError:
                sol = torch.linalg.pinv(block) @ wu
        err = (wu * sol).sum(dim=(1, 2)) / p.energy
        out[idxs] = err.clamp_min(0).cpu().numpy()
    return out


def _remove(p: Problem, unit: int) -> None:
    cols = p.cols_of.pop(unit, None)
    if cols is None or not cols.size:
        return
    c = torch.as_tensor(cols, dtype=torch.long, device=p.w.device)
    block = p.hinv[c][:, c]
    binv = torch.linalg.pinv(block, hermitian=True)
    left = p.hinv[:, c] @ binv
    p.w -= left @ p.w[c]
    p.hinv -= left @ p.hinv[c, :]
    p.w[c] = 0
    p.hinv[c, :] = 0
    p.hinv[:, c] = 0


def greedy_obs(problems: list[Problem], num_units: int, k: int, forced: list[int] | None = None) -> list[int]:
    """Remove ``k`` of ``num_units`` units greedily by summed normalised OBS error.

    Updates every problem's ``w`` to the refit of the kept columns. Returns the removed units.
    ``forced``: remove exactly these units instead of choosing (refit only).
    """
    if forced is not None:
        for u in forced:
            for p in problems:
                _remove(p, u)
        return sorted(forced)
    remaining = list(range(num_units))
    removed: list[int] = []
    for _ in range(k):
        total = np.zeros(len(remaining))
        for p in problems:
            total += _unit_errors(p, remaining)
        pick = remaining[int(np.argmin(total))]
        for p in problems:
            _remove(p, pick)
        remaining.remove(pick)
        removed.append(pick)
    return sorted(removed)


def refit(p: Problem, columns: int, out: int, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The problem's solution as a full ``(out, columns)`` weight (zeros on dead columns) and bias."""
    weight = torch.zeros(out, columns, dtype=p.w.dtype, device=p.w.device)
    bias = None
    for row, col in enumerate(p.live.tolist()):
        if col == columns:
            bias = p.w[row]
        else:
            weight[:, col] = p.w[row]
    if has_bias and bias is None:
        bias = torch.zeros(out, dtype=p.w.dtype, device=p.w.device)
    return weight, bias
