"""tledge.perf.release_memory: with tune_allocator's thresholds, freed blocks stay resident until a trim."""
from __future__ import annotations

import platform

import numpy as np
import pytest

from tledge.perf import release_memory, tune_allocator


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_memory_gives_freed_heap_back() -> None:
    assert tune_allocator()["applied"]
    blocks = [np.ones(2**17) for _ in range(400)]  # 400 MiB in 1 MiB blocks: kept in the heap when freed
    before = _rss_mib()
    del blocks
    kept = _rss_mib()
    assert release_memory()
    after = _rss_mib()
    assert kept > before - 100 and after < kept - 300, (before, kept, after)
