"""Memory that pruning frees is handed back to the operating system."""

import sys

import numpy as np
import pytest

from icnn_compress._memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_freed_heap_pages_are_returned():
    # 3000 blocks of 64 KB come from the heap (below glibc's mmap threshold); a small block after
    # them keeps glibc from trimming the heap's top by itself when they are freed
    blocks = [np.ones(8192) for _ in range(3000)]
    fence = [np.ones(8) for _ in range(1000)]
    del blocks
    before = _rss_mb()
    assert release_freed_memory()
    assert before - _rss_mb() > 100  # of the ~190 MB freed
    del fence
