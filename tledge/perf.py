"""Process-wide performance settings that tledge applies once, before heavy work, and reports.

glibc's malloc returns large freed blocks (convolution activations) to the kernel with munmap and
maps them again on the next forward pass; the page faults dominate CPU inference here (measured on
this 2-core machine: mobilenet_v2 batch 64 at 224 px, 26.9 ms/image by default, 5.8 ms/image with
the thresholds below). Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps those blocks in the heap,
as the MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ environment variables would. Opt out with
TLEDGE_MALLOC_TUNING=0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1
_state: dict[str, object] = {"applied": False, "reason": "not attempted"}


def tune_allocator() -> dict[str, object]:
    """Apply the glibc thresholds once (no-op elsewhere); returns what was done, for reports."""
    if _state["reason"] != "not attempted":
        return dict(_state)
    if os.environ.get("TLEDGE_MALLOC_TUNING", "1") == "0":
        _state.update(applied=False, reason="disabled by TLEDGE_MALLOC_TUNING=0")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state.update(applied=False, reason="not glibc")
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
            _state.update(applied=ok, reason="mallopt M_MMAP_THRESHOLD/M_TRIM_THRESHOLD=2^31-1" if ok
                          else "mallopt refused")
        except OSError as exc:
            _state.update(applied=False, reason=f"libc not loadable: {exc}")
    return dict(_state)


def release_memory() -> bool:
    """Give the heap's free memory back to the kernel (glibc ``malloc_trim(0)``): with the thresholds above,
    freed blocks stay in the heap, so a process that is done with a large working set and goes on to wait, e.g.
    for a child process, keeps it resident (seen: benchmarks/qat.py at 12 GB while its 9 GB export child ran; 2 GB
    after a trim). Returns whether a trim ran."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded; None on other platforms or where it cannot be loaded."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
