"""reference.gathered: a product on its kept channels equals the full-width masked product.

Oracle: the definition of the masked reference -- zero the removed positions of the input, the
weight and the bias, run the op at full width, zero the output's removed positions -- on random
masks, including masks that disagree (a weight row removed where the output is kept, an input
channel kept where the weight's column is removed); and the cases it must decline run at full
width (``None``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune.reference.gathered import gathered_product

aten = torch.ops.aten


def _vector_mask(rng: np.random.Generator, size: int, share: float = 0.35) -> np.ndarray:
    keep = rng.random(size) > share
    keep[rng.integers(size)] = True  # never all removed
    return keep


def _along(keep: np.ndarray, ndim: int, dim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[dim] = keep.size
    return keep.reshape(shape)


def _masked(func, x, w, b, rest, mx, mw, mb, mo) -> torch.Tensor:
    """The masked reference's definition, at full width."""
    def zero(t, m):
        return t if m is None else torch.where(torch.as_tensor(m), t, torch.zeros((), dtype=t.dtype))
    y = func(zero(x, mx), zero(w, mw), None if b is None else zero(b, mb), *rest)
    return zero(y, mo)


CASES = [
    # func, x shape, weight shape, channel dim, rest of the arguments
    (aten.conv2d.default, (2, 6, 7, 7), (5, 6, 3, 3), 1, ([1, 1], [1, 1], [1, 1], 1)),
    (aten.conv2d.default, (6, 7, 7), (5, 6, 3, 3), 0, ([2, 2], [0, 0], [1, 1], 1)),  # unbatched
    (aten.conv1d.default, (3, 6, 11), (8, 6, 3), 1, ([1], [1], [2], 1)),
    (aten.conv3d.default, (1, 4, 5, 5, 5), (3, 4, 1, 3, 3), 1, ([1, 1, 1], [0, 1, 1], [1, 1, 1], 1)),
    (aten.linear.default, (2, 3, 6), (5, 6), 2, ()),
    (aten.linear.default, (6,), (5, 6), 0, ()),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("bias", [True, False])
def test_a_gathered_product_equals_the_masked_one(case: int, seed: int, bias: bool) -> None:
    func, xs, ws, cdim, rest = CASES[case]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, w = torch.randn(xs), torch.randn(ws)
    b = torch.randn(ws[0]) if bias else None
    # independent masks: they need not agree (the reference re-derives each from the plan)
    keep_in, keep_out = _vector_mask(rng, ws[1]), _vector_mask(rng, ws[0])
    mx = _along(keep_in, len(xs), cdim) if seed != 1 else None
    w_cols, w_rows = _vector_mask(rng, ws[1]), (keep_out if seed % 2 == 0 else _vector_mask(rng, ws[0]))
    mw = _along(w_rows, len(ws), 0) & _along(w_cols, len(ws), 1)
    mb = _vector_mask(rng, ws[0]) if bias and seed == 3 else (keep_out if bias else None)
    mo = _along(keep_out, len(xs), cdim)
    got = gathered_product(func, (x, w, b, *rest), {}, [mx, mw, mb], mo, min_work=0)
    assert got is not None
    want = _masked(func, x, w, b, rest, mx, mw, mb, mo)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got.index_select(cdim, torch.as_tensor(np.flatnonzero(~keep_out))) == 0)


def test_it_declines_what_it_cannot_do_exactly() -> None:
    x, w = torch.randn(2, 6, 5, 5), torch.randn(6, 1, 3, 3)
    keep = np.ones(6, bool)
    keep[2] = False
    mo = _along(keep, 4, 1)
    depthwise = (x, w, None, [1, 1], [1, 1], [1, 1], 6)
    assert gathered_product(aten.conv2d.default, depthwise, {}, [mo, None, None], mo) is None
    w = torch.randn(4, 6, 3, 3)
    plain = (x, w, None, [1, 1], [1, 1], [1, 1], 1)
    # nothing removed: nothing to gain
    assert gathered_product(aten.conv2d.default, plain, {}, [None, None, None], None) is None
    # an input mask that also removes spatial positions is no per-channel product
    spatial = np.ones((6, 5, 5), bool)
    spatial[:, 0, 0] = False
    assert gathered_product(aten.conv2d.default, plain, {}, [spatial, None, None], None) is None
    # a weight mask along the kernel's dims
    kernel = np.ones((4, 6, 3, 3), bool)
    kernel[..., 0, 0] = False
    assert gathered_product(aten.conv2d.default, plain, {}, [mo, kernel, None], None) is None
    assert gathered_product(aten.relu.default, (x,), {}, [mo], mo) is None
