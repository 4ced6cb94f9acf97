"""Errors raised by graphprune.

Every error says what went wrong *and* what the caller can do about it, so that a user who
hits one does not have to read graphprune's source to get going again.
"""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class InputError(GraphPruneError, ValueError):
    """The arguments given to a graphprune function are not usable (bad ratio, not a module...)."""


class TraceError(GraphPruneError):
    """torch.export could not trace the model, or the model rejected the example input."""


class VerificationError(GraphPruneError):
    """The compact model does not match the reference computed from the plan."""


class PlanMismatchError(GraphPruneError):
    """A saved plan does not fit the model it is applied to."""


class DistributedError(GraphPruneError):
    """torch.distributed work cannot go on: no process group, ranks that disagree, a failed rank."""


class SlowerModelWarning(UserWarning):
    """A benchmark measured the compact model slower than the original.

    Warned rather than raised: the model is still correct, but the user asked for speed and
    should see that this model (at these widths, on this runtime) does not deliver it.
    """
