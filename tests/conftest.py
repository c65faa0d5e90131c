import os
import random

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one process per core (tools/test.sh): more threads per worker would oversubscribe the cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Fixed seeds for every test; the global RNG state is restored afterwards."""
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.random.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test has its own ``ICNN_COMPRESS_CACHE`` (latency tables, INT8 choices, unpacked
    Fashion-MNIST): nothing a test measures lands in the user's cache, nothing cached leaks in."""
    monkeypatch.setenv("ICNN_COMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
