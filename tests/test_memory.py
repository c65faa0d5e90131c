"""Memory that pruning frees is handed back to the operating system."""

import subprocess
import sys
import textwrap

import pytest

# in a fresh interpreter: how much of the heap a test runner's process has already fragmented (a
# pytest-xdist worker after hundreds of tests) is not what this measures
SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from icnn_compress._memory import release_freed_memory

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    # 3000 blocks of 64 KB come from the heap (below glibc's mmap threshold); a small block after
    # them keeps glibc from trimming the heap's top by itself when they are freed
    blocks = [np.ones(8192) for _ in range(3000)]
    fence = [np.ones(8) for _ in range(1000)]
    del blocks
    before = rss_mb()
    trimmed = release_freed_memory()
    print(trimmed, before - rss_mb())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_freed_heap_pages_are_returned():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    trimmed, released_mb = done.stdout.split()
    assert trimmed == "True"
    assert float(released_mb) > 100, released_mb  # of the ~190 MB freed
