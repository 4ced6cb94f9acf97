"""Per-ATen-op channel rules, one module per op family; the registry they use is ``registry``.

This package's ``__init__`` only loads the families (their ``@rule`` decorators register them);
the rule files import ``registry``, never this package, so loading them has no cycle.
"""

from __future__ import annotations


def load_all() -> None:
    """Import the rule modules so their decorators run."""
    from graphprune.graph.rules import attention, creation, nn, pointwise, recurrent, shape  # noqa: F401
