"""The C allocator of a process that runs models on CPU threads (glibc; elsewhere nothing changes).

Call ``configure_allocator`` once at start-up, before the threads that run
models allocate: ``segsvc serve``, ``batch``, ``train`` and ``eval`` do.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h


def configure_allocator() -> bool:
    """Keep freed activation buffers for reuse instead of unmapping them (glibc only).

    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh
    ``mmap`` pages and returns them on free, so every forward pass over a large
    image or batch page-faults and zeroes its activations again; on a CPU host
    that costs more than the convolutions of a small model. Raising the mmap and
    trim thresholds makes the heap keep and reuse those blocks (the resident
    size stays at its peak, as for any long-running server).

    Those thresholds govern the main heap. A thread's first allocation would
    otherwise give it an arena of its own, made of 64 MiB heaps that glibc
    shrinks and unmaps as they empty: the server's batch thread then faulted
    about 45 MiB of activations afresh on every U-Net (base 16) request at
    360x480, some 11,400 page faults, and the request took 1.2-1.3x as long
    as with one arena (``bench/bench_allocator.py``). So every thread shares
    the main arena, unless ``MALLOC_ARENA_MAX`` is set, which is left to glibc.
    """
    settings = [(_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30)]
    if "MALLOC_ARENA_MAX" not in os.environ:
        settings.append((_M_ARENA_MAX, 1))
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([libc.mallopt(param, value) == 1 for param, value in settings])
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the allocator's defaults
        return False
