"""The independent masked reference that ``verify`` checks compact models against.

``masks``: which positions a plan removes, re-derived from ``plan.slices`` alone, as keep-masks
per graph node; ``interpreter``: the original traced program run with those positions held at
zero (statistics over pruned channels gathered on the kept positions), with ``scratch``
holding the user's weights' masked copies in reused buffers; ``run``: computing the
reference outputs (and per-module values) and comparing a compact model with them;
``tolerance``: how close is close enough (per dtype, or a small model's own rounding error);
``blockwise``: the comparison block by block; ``heap``: freed pages back to the OS.
See ``graphprune/verify.py`` for why that reference equals removal.
"""
