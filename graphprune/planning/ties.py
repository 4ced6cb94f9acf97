"""Breaking ties between unit scores by a second measure instead of by unit index.

When a criterion gives several units of a group the same score, ``np.argsort`` would remove the
lowest-numbered ones: an accident of layout, not a judgement. That happens for real: APoZ on
an LSTM (its hidden state is never exactly zero, so every unit's zero fraction is 0), Taylor on
a layer whose gradients vanish, BN scale on a freshly initialised model (every gamma is 1), a
callable that returns constants. A second measure then decides among the tied units (APoZ: the
mean |activation|; every criterion: the units' L2 magnitude), folded into the scores so that
the order of units with different primary scores never changes.
"""

from __future__ import annotations

import numpy as np

from graphprune.graph.arrays import distinct


def has_ties(scores: np.ndarray) -> bool:
    return distinct(scores).size < scores.size


def lexicographic(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """``primary``, with tied units ordered by the non-negative ``secondary`` (larger = kept longer).

    Adds ``secondary / max(secondary)`` times half the smallest gap between distinct primary
    scores, so units with different primary scores keep their order and their spacing (within
    half a gap); with all primary scores equal the half-gap is half their magnitude (or 0.5).
    """
    p = np.asarray(primary, dtype=np.float64)
    s = np.abs(np.asarray(secondary, dtype=np.float64))
    if p.size < 2 or s.shape != p.shape or not has_ties(p):
        return p
    top = s.max()
    if not np.isfinite(top) or top <= 0:
        return p
    values = distinct(p)
    gap = np.diff(values).min() if values.size > 1 else max(abs(float(values[0])), 1.0)
    return p + 0.5 * gap * (s / top)
