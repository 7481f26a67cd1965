"""The host-heap policy of the benches (`--host-heap keep|release`), the same on both sides.

`keep` is what candle_fused_train::keep_freed_memory does for `candle-fused bench` and
`finetune`: glibc mmaps no chunk (M_MMAP_MAX = 0) and trims its heap only past 2 GiB free
(M_TRIM_THRESHOLD), so a freed output's pages are reused warm by the next call instead of
being faulted in (and zeroed by the kernel) again. `release` leaves glibc's defaults.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def apply(policy):
    """Applies `policy` ("keep" or "release"); returns what the process now runs with."""
    if policy != "keep":
        return "release"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        ok = False
    return "keep" if ok else "release"
