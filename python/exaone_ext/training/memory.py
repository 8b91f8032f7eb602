"""Freed memory kept in the process for the next step (CPU training).

A training step frees and allocates the same large tensors every time: the gradients (set to None
by zero_grad and made again by backward), the activations saved for backward, the loss's chunk
buffers. glibc's malloc hands blocks of 32 MiB and more straight back to the kernel when they are
freed (a block that large is its own mmap), and trims the top of its heap past 128 KiB, so every
step first-touches its memory again: one page fault per 4 KiB page, the kernel zeroing each page
on the way. Measured on the benchmark's training step (8 layers, hidden 512, vocabulary 102400,
1024 tokens, float32, 2-core Zen 3): about 250 000 page faults and 0.7 s of system time a step,
none once the memory is kept.

keep_freed_memory() turns both off for the process (glibc's M_MMAP_MAX = 0, M_TRIM_THRESHOLD at
its largest), so freed blocks stay in the heap and are reused by the next allocation that fits.
The price: the process keeps its peak footprint until it exits, which a training run reaches on
its first step anyway. The trainer applies it on CPU unless the recipe says
[train] keep_freed_memory = false. Other C libraries (musl, macOS) have no such switch: nothing
is changed there.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1
_applied = False


def keep_freed_memory() -> bool:
    """Keep memory freed by tensors inside the process for reuse (see the module docstring).
    Returns True where it took effect (glibc), False elsewhere. Calling it again does nothing more."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both settings are needed (an mmap'd block is never reused)
    if mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    if mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        return False
    _applied = True
    return True
