"""Giving freed memory back to the operating system while a model streams through, block by block.

A streamed run frees each block's weights and working tensors (tens of MB each) once the block is
done. glibc's allocator keeps much of that: after a large block is freed its ``mmap`` threshold
rises (up to 32 MiB), later tensors of that size come from the heap, and the heap's free space is
returned only from its top. Measured on a 3-block synthetic Llama (hidden 2048, MLP 8192; Wanda,
bf16, 8 x 256 tokens) the resident set grew by about 100 MB per block, so a 24-block model peaked
at twice what one block needs. :func:`fixed_mmap_threshold` pins the threshold (large tensors always
``mmap``-ed, so their pages go back at ``free``) and :func:`release_freed` trims the heap after each
block. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any, Optional

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@lru_cache(maxsize=1)
def _libc() -> Optional[Any]:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.malloc_trim.argtypes, lib.mallopt.argtypes = [ctypes.c_size_t], [ctypes.c_int, ctypes.c_int]
        return lib
    except (OSError, AttributeError):  # not glibc (macOS, musl without these): nothing to do
        return None


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Allocations of at least ``nbytes`` are ``mmap``-ed from now on, in this process (glibc's
    dynamic threshold switched off); whether it took effect."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release_freed() -> bool:
    """Return the heap's free memory to the system (``malloc_trim(0)``); whether any was."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))


__all__ = ["fixed_mmap_threshold", "release_freed"]
