"""The one coupling rule most ops reduce to: an einsum over lettered dimensions.

Elementwise ops (with broadcasting), matmul/linear/bmm and reductions are all einsums: every
input dimension gets a letter, letters shared between inputs are the same index, letters absent
from the output are summed over. From that description alone we can say, for any such op:

1. positions sharing a letter must be removed together (edges between the inputs' ids);
2. a labelled letter meeting an *unlabelled* dimension of size > 1 must keep its size (and so
   must one of size 1 meeting an unlabelled size-1 dim: a parameter's single-channel dim);
3. a factor spanning both kept and summed letters (q's (head, head_dim) in ``q @ k.T``) is
   merged along the summed letters, so the output's kept letters get one id per position
   (whole attention heads become one unit);
4. the output's labels are the inputs' factors restricted to the output letters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphprune.graph.labels import Coupler, Factor, TensorLabels

Operand = tuple[TensorLabels | None, tuple[int, ...], Sequence[str]]


def _entry_letters(factor: Factor, letters: Sequence[str]) -> tuple[str, ...]:
    return tuple(letters[d] for d in factor.dims)


def _aligned(ids: np.ndarray, src: Sequence[str], dst: Sequence[str]) -> np.ndarray:
    return np.transpose(ids, [list(src).index(ch) for ch in dst])


def einsum_labels(
    coupler: Coupler,
    operands: Sequence[Operand],
    out_letters: Sequence[str],
    out_shape: Sequence[int],
    reason: str,
) -> TensorLabels:
    """Couple the operands of an einsum-like op and return the output's labels.

    ``operands`` holds, per input, its labels (None if unlabelled or not a tensor), its shape
    and one letter per dimension.
    """
    sizes: dict[str, int] = {}
    for _, shape, letters in operands:
        for ch, n in zip(letters, shape, strict=True):
            sizes[ch] = max(sizes.get(ch, 1), n)

    entries: list[tuple[int, tuple[str, ...], Factor]] = []
    for k, (labels, shape, letters) in enumerate(operands):
        if labels is None:
            continue
        for f in labels.factors:
            ls = _entry_letters(f, letters)
            if any(shape[d] == 1 and sizes[ch] > 1 for d, ch in zip(f.dims, ls, strict=True)):
                coupler.freeze(f.ids, f"{reason}: a labelled dimension of size 1 is broadcast")
                continue
            entries.append((k, ls, f))

    # (2) a labelled letter meeting an unlabelled dimension of size > 1 keeps its size
    for k, (labels, shape, letters) in enumerate(operands):
        covered = set()
        if labels is not None:
            for f in labels.factors:
                covered.update(f.dims)
        # an unlabelled size-1 dim is fixed too when the letter has size 1 everywhere: a labelled
        # channel dim of size 1 (one channel split off) meeting a Linear weight's in-dim of size
        # 1, which parameters leave unlabelled -- removing the channel would leave the weight
        # unsliced (found by fuzzing)
        fixed = {
            ch for d, ch in enumerate(letters) if d not in covered and (shape[d] > 1 or sizes[ch] == 1)
        }
        for k2, ls, f in entries:
            if k2 == k:
                continue
            for ax, ch in enumerate(ls):
                if ch in fixed:
                    coupler.require_intact(f, ax, f"{reason}: meets a fixed-size dimension")

    # (1) positions sharing letters are the same structure
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            ki, li, fi = entries[i]
            kj, lj, fj = entries[j]
            if ki == kj:
                continue
            shared = set(li) & set(lj)
            if not shared:
                continue
            if set(li) == set(lj):
                coupler.union(fi.ids, _aligned(fj.ids, lj, li))
                continue
            small, big = ((li, fi), (lj, fj)) if len(li) < len(lj) else ((lj, fj), (li, fi))
            if set(small[0]) < set(big[0]) and big[0][0] in small[0]:
                # per-head quantity (attention probabilities) meeting per-(head, dim) values:
                # the head is one unit
                sub = _aligned(big[1].ids, big[0], list(small[0]) + [c for c in big[0] if c not in small[0]])
                coupler.union(
                    sub, small[1].ids.reshape(small[1].ids.shape + (1,) * (sub.ndim - small[1].ids.ndim))
                )
                continue
            if coupler.inner_tables and set(small[0]) < set(big[0]):
                # a table over the inner letters, broadcast across the outer ones (RoPE's cos
                # over head_dim, across heads): position by position, the outer axes stay whole
                outer = [c for c in big[0] if c not in small[0]]
                sub = _aligned(big[1].ids, big[0], outer + list(small[0]))
                coupler.union(sub, small[1].ids)
                for c in outer:
                    coupler.require_intact(big[1], big[0].index(c), f"{reason}: table shared by every head")
                continue
            for ch in shared:  # shared across the outer axis (a per-head_dim weight): keep it whole
                coupler.require_intact(fi, li.index(ch), f"{reason}: incompatible channel layouts")
                coupler.require_intact(fj, lj.index(ch), f"{reason}: incompatible channel layouts")

    # (3)+(4) restrict to the output letters
    out_entries: list[tuple[tuple[str, ...], Factor]] = []
    for _, ls, f in entries:
        keep = [ax for ax, ch in enumerate(ls) if ch in out_letters]
        if not keep:
            continue
        if len(keep) < len(ls):
            f = coupler.coarsen(f, keep)
            ls = tuple(ls[ax] for ax in keep)
        placed = False
        for oi, (ols, of) in enumerate(out_entries):
            if set(ols) == set(ls):
                placed = True
                break
            if set(ols) < set(ls) or set(ls) < set(ols):
                # coupled in step (1): the larger layout carries both
                if len(ls) > len(ols):
                    out_entries[oi] = (ls, f)
                placed = True
                break
            if set(ols) & set(ls):
                # overlapping but different: the smaller cannot be tracked further
                if len(ls) > len(ols):
                    coupler.freeze(of.ids, f"{reason}: incompatible channel layouts")
                    out_entries[oi] = (ls, f)
                else:
                    coupler.freeze(f.ids, f"{reason}: incompatible channel layouts")
                placed = True
                break
        if not placed:
            out_entries.append((ls, f))

    factors = []
    for ls, f in out_entries:
        dims = [out_letters.index(ch) for ch in ls]
        order = np.argsort(dims)
        ids = np.transpose(f.ids, order) if f.ids.ndim > 1 else f.ids
        factors.append(Factor(tuple(dims[o] for o in order), ids, f.origin, tuple(f.axes[o] for o in order)))
    return TensorLabels(tuple(out_shape), factors)


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def broadcast_letters(rank: int, out_rank: int) -> str:
    """Letters of an operand of rank ``rank`` broadcast against an output of ``out_rank``."""
    return LETTERS[out_rank - rank : out_rank]
