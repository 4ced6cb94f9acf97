"""Handing freed memory back to the operating system (glibc's ``malloc_trim``).

The masked reference makes a masked copy of each pruned weight just before the op that reads
it and frees it right after. glibc serves allocations below its mmap threshold from its heap,
and raises that threshold (up to 32 MiB) after large frees; a freed 16 MiB weight copy then
stays in the heap as free memory the process still holds. Over a decoder's hundreds of weights
that added 0.65 GiB to the peak RSS of compacting a 4.1 GiB TinyLlama (tools/llm_memory.py
--where), with nothing alive to show for it. ``malloc_trim(0)`` returns such free pages (in
every arena, not only at the top of the heap) to the OS. Elsewhere (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc); does nothing where unsupported."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
