"""Give large CPU tensors back to the operating system when they are freed (glibc only).

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and it
raises that threshold to the size of every mmapped block freed (up to 32 MiB). After the first
chunk of a Phase-1 pass, every chunk-sized activation (several MiB) therefore comes from the heap,
which fragments and is rarely trimmed: peak RSS grows with the number of chunks, i.e. with the
stream, by ~0.8 KB per token on top of the [n, C] contexts (measured with benchmarks/scale.py).
A fixed 1 MiB threshold maps each large tensor on its own and unmaps it on free, so peak RSS is
what is live. `MALLOC_MMAP_THRESHOLD_` set by the user (or another allocator preloaded) wins;
`NEWLLM_KIT_MALLOC=system` keeps glibc's defaults (benchmarks/scale.py compares the two).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; False where it does not apply (not glibc, or already set)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if os.environ.get("NEWLLM_KIT_MALLOC") == "system":
        return False
    if "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
