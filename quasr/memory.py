"""Keep the resident memory of long calibration runs close to what is really alive.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which the many
1-10 MB activation tensors of a calibration walk come from the heap, where freed space is rarely given
back: peak RSS then grows by a GB or more, and varies from run to run (whisper-tiny.en GPTQ: 2.7 to 3.9 GB).
A fixed 4 MB threshold keeps the largest tensors (the encoder's FFN activations) in their own mappings,
returned to the OS when freed (2.7 GB); 1 MB saves a little more memory but costs 25% more time in page
faults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3


@functools.cache
def fixed_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """Set glibc's mmap threshold once per process; False where there is no glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
