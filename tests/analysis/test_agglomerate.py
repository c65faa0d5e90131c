"""The clustering behind cluster_filters: SciPy's hierarchy gives the partitions scikit-learn's
AgglomerativeClustering gives on the same precomputed distances (cut by threshold or by count)."""

import numpy as np
import pytest
import torch
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from icnn_compress.analysis._clusters import _agglomerate


@pytest.mark.parametrize("method", ["average", "complete", "single"])
def test_same_partitions_as_scikit_learn(method):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(2, 80))
        x = rng.random((n, 4))
        cats = rng.integers(0, 3, n)
        # like filter_distances: a part distance plus a penalty across categories
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) + (cats[:, None] != cats[None, :])
        np.fill_diagonal(d, 0)
        if trial % 2:
            k = int(rng.integers(1, n + 1))
            ref = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=method)
            got = _agglomerate(torch.tensor(d), None, k, method)
            assert len(set(got.tolist())) == k
        else:
            thr = float(rng.uniform(0.05, 1.5))
            ref = AgglomerativeClustering(
                n_clusters=None, distance_threshold=thr, metric="precomputed", linkage=method
            )
            got = _agglomerate(torch.tensor(d), thr, None, method)
        assert adjusted_rand_score(ref.fit_predict(d), got) == 1.0
        assert got[0] == 0 and set(got.tolist()) == set(range(got.max() + 1))  # numbered from 0
