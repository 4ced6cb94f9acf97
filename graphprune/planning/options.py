"""The options a pruning run is made of, each validated once, where it is built.

* ``StructureOptions``: what the analysis may prune (``attention`` mode, ``prune_hidden``);
  they change the groups, so a new value needs a new analysis.
* ``CutOptions``: where to cut within those groups (global ranking, its cap, per-module ratios,
  rounding of kept widths, exact counts); plans for any number of them follow one analysis.

Both are frozen: a run that needs other options builds new ones (``dataclasses.replace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphprune.errors import InputError
from graphprune.graph.analysis import check_attention

DEFAULT_MAX_RATIO = 0.9


@dataclass(frozen=True)
class StructureOptions:
    """What the analysis may prune: see ``compact``'s ``attention`` and ``prune_hidden``."""

    attention: str = "heads"
    prune_hidden: bool = False

    def __post_init__(self) -> None:
        check_attention(self.attention)

    def as_kwargs(self) -> dict[str, Any]:
        """The keywords of ``analyze``."""
        return {"prune_hidden": self.prune_hidden, "attention": self.attention}


@dataclass(frozen=True)
class CutOptions:
    """Where to cut: see ``planning.cut`` (validated when built)."""

    global_pruning: bool = False
    max_ratio: float | None = None
    ratios: Mapping[str | int, float] | None = None
    round_to: int | None = None
    counts: Mapping[int, int] | None = None  # group index -> exact units to remove (no rounding)

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def cap(self) -> float:
        """The largest share of one group that global pruning may remove."""
        return DEFAULT_MAX_RATIO if self.max_ratio is None else float(self.max_ratio)


def check_fraction(value: Any, what: str, upper_inclusive: bool = False) -> float:
    """``value`` as a float in [0, 1) (or [0, 1]), else an InputError naming ``what``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = 0 <= v <= 1 if upper_inclusive else 0 <= v < 1
    if not ok:
        rng = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise InputError(f"{what} must be a number in {rng}, got {value!r}")
    return float(value)


def check_options(opts: CutOptions) -> CutOptions:
    """Refuse bad where-to-cut values with what to pass instead (called by ``CutOptions``)."""
    if opts.max_ratio is not None:
        check_fraction(opts.max_ratio, "max_ratio", upper_inclusive=True)
    if opts.round_to is not None and (
        isinstance(opts.round_to, bool) or not isinstance(opts.round_to, int) or opts.round_to < 1
    ):
        raise InputError(f"round_to must be a positive integer (e.g. 8), got {opts.round_to!r}")
    if opts.ratios is not None:
        if not isinstance(opts.ratios, Mapping):
            raise InputError(
                "ratios must be a dict {module path or group index: ratio}, e.g. {'layer1': 0.5}"
            )
        for k, v in opts.ratios.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise InputError(f"ratios keys are module paths (str) or group indices (int), got {k!r}")
            check_fraction(v, f"ratios[{k!r}]")
    return opts
