"""Write the compiled bytecode of the packages a timing tool compares, before it times them.

A package installed by pip is compiled at install time, so its first import in a fresh process
reads ``.pyc`` files. graphprune run from a checkout (an editable install, or ``sys.path``) is
compiled on its first import instead, and not at all where ``PYTHONDONTWRITEBYTECODE`` is set (as
on this project's machines): then every fresh process compiles its ~90 modules from source again
(0.1-0.2 s), a cost Torch-Pruning's installed wheel never pays. Cold-start timings
(tools/cold_time.py, tools/zoo.py) call :func:`compile_packages` first so that both tools start
from what a user's install holds.
"""

from __future__ import annotations

import compileall
import importlib.util
from pathlib import Path


def compile_packages(*names: str) -> list[str]:
    """Compile every module of each importable package in ``names`` (``py_compile`` writes the
    ``__pycache__`` files whatever ``PYTHONDONTWRITEBYTECODE`` says); returns the packages found."""
    done = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        compileall.compile_dir(str(Path(spec.origin).parent), quiet=1)
        done.append(name)
    return done
