"""Freed memory kept in the process for reuse (CPU).

glibc's malloc hands a block of 32 MiB or more straight back to the kernel when it is freed (such a
block is its own mmap) and trims the top of its heap past 128 KiB, so a program that frees and
allocates the same large tensors over and over first-touches its memory every time: one page fault
per 4 KiB page, the kernel zeroing each page on the way. On the CPU that is every training step
(the gradients set to None by zero_grad and made again by backward, the activations saved for
backward, the loss's chunk buffers) and every long prefill (each layer's activations, the float32
tiles of 16-bit weights). Measured on a 2-core Zen 3: the benchmark's training step (8 layers,
hidden 512, vocabulary 102400, 1024 tokens, float32) faulted about 250 000 times and spent 0.7 s in
the kernel a step; a 2048-token prefill through two layers of the 2.4B shape faulted 230 000 times
and took 4.41-5.38 s against 4.04-4.48 s with the memory kept (alternated in one process).

keep_freed_memory() turns both off for the process (glibc's M_MMAP_MAX = 0, M_TRIM_THRESHOLD at
its largest), so freed blocks stay in the heap and are reused by the next allocation that fits.
The price: the process keeps its peak footprint until it exits, plus blocks that a later
allocation of another size cannot reuse (130-290 MB on the training step above). The trainer
applies it on CPU unless the recipe says [train] keep_freed_memory = false; the exaone-ext
commands that run a model on the CPU (generate, chat, serve, niah) apply it unless given
--no-keep-freed-memory. EXAONE_EXT_KEEP_FREED_MEMORY=0 in the environment turns it off for every
caller. Other C libraries (musl, macOS) have no such switch: nothing is changed there.
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1
_applied = False


def keep_freed_memory() -> bool:
    """Keep memory freed by tensors inside the process for reuse (see the module docstring).
    Returns True where it took effect (glibc), False elsewhere or when EXAONE_EXT_KEEP_FREED_MEMORY=0.
    Calling it again does nothing more."""
    global _applied
    if _applied:
        return True
    if os.environ.get("EXAONE_EXT_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
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
