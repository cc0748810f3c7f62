"""configure_allocator: threads that run models allocate from the main heap, whose freed blocks are kept.

Each check runs in a fresh interpreter: glibc hands a new thread the arena of a
thread that has exited, so in the long-lived test process the outcome would
depend on the tests that ran before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


pytestmark = pytest.mark.skipif(not _glibc(), reason="configure_allocator tunes glibc's allocator only")

# Where a worker thread's 8 MiB block comes from: the main heap lies below the program break
# (sbrk(0)); a per-thread arena is a separately mapped region far above it.
PROBE = textwrap.dedent("""
    import ctypes, json, threading
    from segsvc.inference.allocator import configure_allocator

    tuned = configure_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_ssize_t]
    found = {}

    def worker():
        block = libc.malloc(8 << 20)
        found["main_heap"] = block < libc.sbrk(0)
        libc.free(block)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(json.dumps({"tuned": tuned, **found}))
""")


def _probe(env: dict[str, str]) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_thread_allocates_from_the_main_heap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _probe(env) == {"tuned": True, "main_heap": True}


def test_an_explicit_malloc_arena_max_is_left_to_glibc() -> None:
    """With MALLOC_ARENA_MAX set (here to glibc's own default count) the thread gets its own arena."""
    found = _probe({**os.environ, "MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1))})
    assert found == {"tuned": True, "main_heap": False}
