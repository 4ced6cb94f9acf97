"""reference/zeroing.py: zeroing by index lines gives exactly what the element-wise mask gives.

Oracle: ``masked_fill(~keep, 0)`` with the broadcast numpy mask, on values large enough for the
line path and small enough for the element-wise one, with infinities and NaNs at removed
positions (they must become exact zeros, not NaN from ``0 * inf``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune.reference.zeroing import LINES_MIN, Zeroing, removed_lines


def _oracle(t: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    mask = torch.as_tensor(keep).reshape((1,) * (t.dim() - keep.ndim) + keep.shape)
    return t.masked_fill(~mask, 0)


def _masks(rng: np.random.Generator) -> list[tuple[tuple[int, ...], np.ndarray, bool]]:
    """(value shape, keep-mask, is a product of per-dimension vectors)."""
    rows = rng.random(64) > 0.3
    cols = rng.random(48) > 0.4
    rows[0], cols[0] = False, False
    full = rng.random((64, 48)) > 0.5  # not a product
    return [
        ((2, 64, 24, 24), rows.reshape(64, 1, 1), True),  # channels of an activation
        ((64, 48, 3, 3), (rows[:, None] & cols[None, :]).reshape(64, 48, 1, 1), True),  # conv weight
        ((64, 48), full, False),
        ((2, 10, 64), rows, True),  # trailing dim, leading dims missing from the mask
        ((3, 64), rows.reshape(1, 64), True),
    ]


def test_removed_lines_finds_products_only() -> None:
    rng = np.random.default_rng(0)
    for shape, keep, product in _masks(rng):
        lines = removed_lines(keep, len(shape))
        assert (lines is not None) == product
        if lines is not None:
            rebuilt = np.ones([1 if s == 1 else s for s in keep.reshape((1,) * (len(shape) - keep.ndim)
                                                                        + keep.shape).shape], dtype=bool)
            for d, gone in lines:
                idx = [slice(None)] * rebuilt.ndim
                idx[d] = gone
                rebuilt[tuple(idx)] = False
            assert np.array_equal(rebuilt, keep.reshape(rebuilt.shape))
    assert removed_lines(np.ones((4, 1), dtype=bool), 2) == []


@pytest.mark.parametrize("scale", [1, 8])  # below and above LINES_MIN for most shapes
def test_zeroing_equals_masked_fill(scale: int) -> None:
    rng = np.random.default_rng(1)
    for shape, keep, _ in _masks(rng):
        shape = (scale, *shape)  # a leading dimension the mask does not name
        t = torch.randn(shape)
        t.view(-1)[:: 7] = float("inf")
        t.view(-1)[3:: 11] = float("nan")
        zero = Zeroing(keep, len(shape), t.device)
        want = _oracle(t, keep)
        got_copy = zero.copy(t)
        assert got_copy.data_ptr() != t.data_ptr()
        out = torch.empty_like(t)
        assert zero.copy(t, out=out) is out
        inplace = t.clone()
        assert zero.into(inplace) is inplace
        for got in (got_copy, out, inplace):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert any(int(np.prod(s)) * 8 >= LINES_MIN > int(np.prod(s)) for s, _, _ in _masks(rng))
