"""Process-level settings for fast CPU inference."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Attention allocates fresh multi-MB buffers on every call; by default glibc serves those with
    mmap and unmaps them on free, so every call page-faults them in again, which in a VM can
    cost as much as the arithmetic. PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for
    the same reason; this is the no-install version. Returns False where it does not apply
    (not glibc). Affects the whole process: call it in inference entry points, not in libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False
