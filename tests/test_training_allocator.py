"""Freed training memory goes back to the OS: every large tensor gets its own mapping."""

import ctypes
import platform

import pytest
import torch

from devft.training.allocator import return_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def _mapped_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def test_large_tensors_are_mapped_and_unmapped_even_after_earlier_frees():
    assert return_freed_memory()
    size = 4 * 2**20
    for _ in range(3):  # glibc's dynamic threshold would move these into the heap after one
        before = _mapped_bytes()
        tensor = torch.empty(size, dtype=torch.uint8)
        assert _mapped_bytes() - before >= size
        del tensor
        assert _mapped_bytes() - before < size
