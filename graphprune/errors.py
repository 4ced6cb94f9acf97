"""Errors raised by graphprune, and its warnings.

Every error says what went wrong *and* what the caller can do about it, so that a user who
hits one does not have to read graphprune's source to get going again.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the caller's own line: the first stack frame outside graphprune.

    A fixed ``stacklevel`` points into graphprune as soon as the call depth changes (a wrapper
    such as ``keeps_global_rng``, an entry point calling another); searching the stack does not.
    """
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


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
