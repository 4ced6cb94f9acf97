"""The ``graphprune`` command line: ``commands`` (the parser and subcommands), ``speed`` (sweep and
target subcommands) and ``demo``.

``main`` is re-exported so the console-script entry point ``graphprune.cli:main`` keeps working.
"""

from graphprune.cli.commands import main

__all__ = ["main"]
