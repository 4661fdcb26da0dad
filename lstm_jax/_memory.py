"""Host memory: keep what XLA:CPU frees, so that the next step does not fault it back in.

XLA:CPU allocates one temporary buffer per execution of a compiled program (the training
step's saved activations, gradients and scratch: 726 MB for a 784-step, 128-unit layer at
batch 128) and frees it when the execution ends. glibc's ``malloc`` serves an allocation
that large with a fresh ``mmap`` and returns it with ``munmap``, so every step touches
hundreds of MiB of new pages: 177,000 page faults per step in that example (each one a
kernel entry and a zeroed 4 KiB page), about 1.5 µs each on the 2-core VM of
``bench/results/``, 10% of the step.

:func:`retain_freed_memory` asks glibc to serve every allocation from its heap (one arena,
no ``mmap``) and to give freed memory back to the operating system only beyond 2 GiB free at
the heap's top. After the first steps the buffer is reused on most steps, without faults. The
cost: the process keeps (up to 2 GiB above) its peak memory until it exits. It changes the
allocator of the whole process (every library in it benefits alike), so it is an explicit
call, not a side effect of ``import lstm_jax``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory for reuse by this process (see the module
    docstring). Call it once, early: before JAX or torch start their threads, whose malloc
    arenas would otherwise be made before the one-arena setting. Idempotent.

    Returns:
      True where it was applied (Linux with glibc); False where there is nothing to do it
      with (another C library or operating system), which is harmless.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt options)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Order matters: one arena first, so that no thread gets a non-main arena, whose heaps
    # (at most 64 MiB each) fall back to mmap for large blocks whatever M_MMAP_MAX says.
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    return bool(ok)
