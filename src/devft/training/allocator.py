"""Give freed training memory back to the OS (glibc), so a client's peak follows its tensors.

glibc's malloc serves a large allocation with its own mapping only above M_MMAP_THRESHOLD,
and raises that threshold (up to 32 MiB) whenever such a block is freed. After the first
training step, activations therefore come from the heap; freed, they stay in the process,
fragmented, and the next step's activations partly land beside them. Measured on a SmolLM2
client at batch 4 x 192 (BENCHMARKS.md, "Client memory"), this added about a third to the
peak RSS. Fixing the threshold at 128 KiB (glibc's initial value) gives every large tensor its
own mapping, returned to the OS when it is freed, unless a free heap chunk already fits it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3
"""mallopt parameter number (glibc malloc.h)."""
THRESHOLD_BYTES = 128 * 1024


@functools.cache
def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (once); False where malloc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
