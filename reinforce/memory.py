"""Freed memory kept for reuse in the batch-heavy commands (build, teacher, distill, finetune, evaluate).

By default glibc returns a freed batch's memory to the kernel (a block over 128 KiB is its own mapping, and the
heap's top is trimmed), so the next batch faults every page in again: in a build, 3.2 M page faults and half of
its CPU time. ``keep_freed_memory`` keeps up to 1 GiB of it for reuse instead (``BATCH_MALLOC``), the first thing
each of those commands' ``main`` does, run as ``python -m`` or forked by ``train.pipeline``: the values are
unchanged. Other C libraries have no ``mallopt``: nothing changes there.
"""

from __future__ import annotations

import ctypes

__all__ = ["BATCH_MALLOC", "keep_freed_memory"]

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
BATCH_MALLOC = {M_TOP_PAD: 256 << 20, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30}


def keep_freed_memory() -> None:
    """Apply ``BATCH_MALLOC`` to this process (and the DataLoader workers it forks later)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    for parameter, value in BATCH_MALLOC.items() if mallopt else ():
        mallopt(parameter, value)
