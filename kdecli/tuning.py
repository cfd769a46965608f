"""Process-wide tuning that a command-line run wants and a library must not impose.

``enable_huge_pages``: large CPU tensors (the logits of n × block, n × samples) are allocated
afresh on every call, and page-faulting them in 4 KiB pages costs as much as the arithmetic.
PyTorch backs large CPU allocations with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is
set before its allocator first runs; kdeformer then runs about 1.5× faster on the CPU while exact
attention is unchanged (README, Benchmarks).  The ``kdecli`` command calls this before it imports
torch; a library user who wants it calls it before creating any tensor.  This module imports
nothing heavy, so calling it first is cheap.
"""

from __future__ import annotations

import os

HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages; a value the user set is kept.

    Returns True when this call set the variable.  PyTorch reads it once, at its first
    allocation: called after that, it has no effect on this process.
    """
    if HUGE_PAGES_VARIABLE in os.environ:
        return False
    os.environ[HUGE_PAGES_VARIABLE] = "1"
    return True
