"""Freed training memory goes back to the OS: every large tensor gets its own mapping.

The check runs in a fresh process: in a long-lived one (the whole test suite) the heap may
already hold a free chunk of 4 MiB or more, left by earlier tests, and glibc serves a request
from such a chunk before it considers a mapping at all."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

CHECK = """
import ctypes
import torch
from devft.training.allocator import return_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
assert return_freed_memory()
size = 4 * 2**20
for _ in range(3):  # glibc's dynamic threshold would move these into the heap after one
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(size, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd - before >= size, "not mapped"
    del tensor
    assert libc.mallinfo2().hblkhd - before < size, "not unmapped"
print("ok")
"""


def test_large_tensors_are_mapped_and_unmapped_even_after_earlier_frees():
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
