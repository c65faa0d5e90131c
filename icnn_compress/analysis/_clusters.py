"""Clusters of filters that share a category and a part (scikit-learn agglomerative clustering)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from torch import Tensor

from icnn_compress.analysis._signatures import LayerSignature
from icnn_compress.errors import ConfigError

__all__ = ["FilterClusters", "cluster_filters", "filter_distances", "ground_truth_parts"]


@dataclass
class FilterClusters:
    """Clusters of one layer's filters.

    Attributes:
        labels: ``(C,)`` cluster id per filter; ``-1`` for dead filters (never fire on the probe set).
        categories: cluster id -> the category its filters share.
        medoids: cluster id -> the filter with the least total distance to the others (kept first).
        spreads: cluster id -> mean distance of its filters to the medoid.
        distances: ``(C, C)`` the distance matrix that was clustered.
        ari: adjusted Rand index against ground-truth (category, part) labels, when landmarks exist.
        gt_parts: ``(C,)`` the ground-truth part of each filter (-1 unknown), when landmarks exist.
    """

    layer: str
    labels: Tensor
    categories: dict[int, int]
    medoids: dict[int, int]
    spreads: dict[int, float]
    distances: Tensor
    ari: float | None = None
    gt_parts: Tensor | None = None

    @property
    def num_clusters(self) -> int:
        return len(self.medoids)

    def members(self, cluster: int) -> list[int]:
        return torch.nonzero(self.labels == cluster).flatten().tolist()


_PAIR_BUDGET = 1 << 22  # elements of the (images, C, C) temporaries of filter_distances (16 MB)


def filter_distances(
    sig: LayerSignature,
    *,
    w_response: float = 0.5,
    w_location: float = 0.5,
    location_scale: float = 0.25,
    category_penalty: float = 1.0,
    cross_category: bool = True,
) -> Tensor:
    """Pairwise filter distance ``(C, C)`` from responses and co-occurring peak locations.

    ``w_response * (1 - corr)/2`` (correlation of per-image peak responses) plus ``w_location *
    min(1, d / location_scale)`` where ``d`` is the response-weighted mean distance between the two
    filters' peaks on the same images, over the image diagonal; plus ``category_penalty`` when the
    filters belong to different categories (so that a threshold below it never merges them).
    ``cross_category=False``: two filters of different categories are not compared; both terms
    are set to their maxima (``w_response + w_location + category_penalty``). Clusters cut below
    ``category_penalty`` are the same, at a fraction of the cost (the distances are measured
    within each category only).
    """
    c, cats = sig.peak_value.shape[1], sig.category
    terms = {"w_response": w_response, "w_location": w_location, "location_scale": location_scale}
    if cross_category:
        dist = _pair_distances(sig, torch.arange(c), **terms)
        dist += category_penalty * (cats[:, None] != cats[None, :]).double()
    else:
        dist = torch.full((c, c), w_response + w_location + category_penalty, dtype=torch.float64)
        for idx in _category_blocks(cats):
            dist[idx[:, None], idx[None, :]] = _pair_distances(sig, idx, **terms)
    dist.fill_diagonal_(0.0)
    return ((dist + dist.t()) / 2).float()


def _category_blocks(category: Tensor) -> list[Tensor]:
    """The filter indices of each category, ``[(c_k,), ...]`` in category order."""
    return [torch.nonzero(category == k).flatten() for k in category.unique()]


def _pair_distances(
    sig: LayerSignature, idx: Tensor, *, w_response: float, w_location: float, location_scale: float
) -> Tensor:
    """The response and location terms of ``filter_distances`` ``(k, k)`` (float64, diagonal not
    cleared, not symmetrised) between the filters ``idx`` ``(k,)``."""
    v = sig.peak_value[:, idx].double()  # (N, k)
    vc = v - v.mean(0)
    norm = vc.norm(dim=0).clamp_min(1e-12)
    corr = (vc.t() @ vc) / (norm[:, None] * norm[None, :])
    d_resp = (1 - corr.clamp(-1, 1)) / 2
    wts = v / v.max(0).values.clamp_min(1e-12)  # (N, k) in [0, 1]
    den = wts.t() @ wts  # (k, k) sum over images of the pair weights
    # the weighted distances a few images at a time: (images, k, k) temporaries of at most
    # _PAIR_BUDGET elements, never (N, C, C) for a wide layer
    xy, w32 = sig.peak_xy[:, idx].float(), wts.float()  # (N, k, 2), (N, k)
    num = torch.zeros(idx.numel(), idx.numel())
    step = max(1, _PAIR_BUDGET // max(1, idx.numel() ** 2))
    for i in range(0, v.shape[0], step):
        xy_i, w_i = xy[i : i + step], w32[i : i + step]
        d = torch.cdist(xy_i, xy_i, compute_mode="donot_use_mm_for_euclid_dist")
        num += (d * w_i[:, :, None] * w_i[:, None, :]).sum(0)
    d_loc = (num.double() / den.clamp_min(1e-12)) / math.hypot(*sig.image_size)
    d_loc[den <= 1e-12] = location_scale  # never fire together: no evidence of a shared part
    return w_response * d_resp + w_location * (d_loc / location_scale).clamp(max=1.0)


def ground_truth_parts(sig: LayerSignature) -> Tensor | None:
    """Each filter's nearest landmark (mean distance from its peak on its category's images)."""
    if sig.landmarks is None:
        return None
    lm = sig.landmarks
    out = torch.full((sig.num_filters,), -1, dtype=torch.long)
    for f in range(sig.num_filters):
        imgs = (sig.labels == sig.category[f]) & (sig.peak_value[:, f] > 0)
        best, best_k = math.inf, -1
        for k in range(lm.shape[1]):
            sel = imgs & (lm[:, k, 2] > 0)
            if int(sel.sum()) < 3:
                continue
            d = float((lm[sel, k, :2] - sig.peak_xy[sel, f]).norm(dim=1).mean())
            if d < best:
                best, best_k = d, k
        out[f] = best_k
    return out


def cluster_filters(
    sig: LayerSignature,
    *,
    distance_threshold: float | None = 0.25,
    n_clusters: int | None = None,
    linkage: str = "average",
    min_alive: float = 0.01,
    gt_parts: Tensor | None = None,
    ari: bool = True,
    **distance_options,
) -> FilterClusters:
    """Group the filters of one layer that share a category and a part.

    Args:
        sig: the layer's signature (``filter_signatures``); works on any conv layer, with or
            without the interpretable loss.
        distance_threshold: merge clusters closer than this (``filter_distances`` units); or
        n_clusters: a fixed number of clusters (then ``distance_threshold`` is ignored).
        linkage: ``"average"``, ``"complete"`` or ``"single"`` (SciPy's hierarchy).
        min_alive: filters that fire on fewer than this fraction of images are dead (label -1).
        gt_parts: ground-truth part per filter for the ARI (default: from the landmarks).
        ari: compute the ARI against ground-truth parts (when landmarks exist).
        distance_options: passed to ``filter_distances``.

    Returns:
        ``FilterClusters``.
    """
    if (distance_threshold is None) == (n_clusters is None):
        raise ConfigError("Give exactly one of distance_threshold and n_clusters.")
    if linkage not in ("average", "complete", "single"):
        raise ConfigError(f"linkage must be 'average', 'complete' or 'single'. Got {linkage!r} instead.")
    dist = filter_distances(sig, **distance_options)
    alive = torch.nonzero(sig.alive >= min_alive).flatten()
    labels = torch.full((sig.num_filters,), -1, dtype=torch.long)
    if alive.numel() == 1:
        labels[alive] = 0
    elif alive.numel() > 1:
        if n_clusters is not None and not 1 <= n_clusters <= alive.numel():
            raise ConfigError(
                f"n_clusters must be in [1, {alive.numel()}] (alive filters). Got {n_clusters}."
            )
        penalty = distance_options.get("category_penalty", 1.0)
        if (
            distance_options.get("cross_category", True)
            or n_clusters is not None
            or distance_threshold >= penalty
        ):
            flat = _agglomerate(dist[alive][:, alive], distance_threshold, n_clusters, linkage)
        else:  # no cluster spans two categories: each category's filters clustered on their own
            flat = np.zeros(alive.numel(), dtype=np.int64)
            for idx in _category_blocks(sig.category[alive]):
                block = alive[idx]
                found = _agglomerate(dist[block][:, block], distance_threshold, None, linkage)
                flat[idx.numpy()] = found + flat.max() + 1
            flat = _first_appearance(flat)
        labels[alive] = torch.as_tensor(flat)
    categories, medoids, spreads = _describe_clusters(labels, dist, sig.category)
    gt = None if not ari else gt_parts if gt_parts is not None else ground_truth_parts(sig)
    ari_value = None
    if gt is not None:
        known = (gt >= 0) & (labels >= 0)
        if int(known.sum()) >= 2:
            from sklearn.metrics import adjusted_rand_score  # its import costs a second: only here

            truth = (sig.category[known] * 1000 + gt[known]).numpy()
            ari_value = float(adjusted_rand_score(truth, labels[known].numpy()))
    return FilterClusters(sig.layer, labels, categories, medoids, spreads, dist, ari_value, gt)


def _describe_clusters(
    labels: Tensor, dist: Tensor, category: Tensor
) -> tuple[dict[int, int], dict[int, int], dict[int, float]]:
    """Each cluster's category (its members' most common one, the smallest on a tie), medoid (the
    member with the least summed distance to the others, the first on a tie) and spread (mean
    distance from the medoid). ``labels`` ``(C,)`` (-1: dead), ``dist`` ``(C, C)``.
    A cluster of one filter is that filter, at spread 0 (the common case on a model without the
    loss: one loop turn per cluster cost a second on MobileNet v2's 7000 clusters)."""
    live = labels[labels >= 0]
    if live.numel() == 0:
        return {}, {}, {}
    size = torch.bincount(live)
    first = torch.full((size.numel(),), labels.numel(), dtype=torch.long)
    first.scatter_reduce_(0, live, torch.nonzero(labels >= 0).flatten(), "amin")
    categories, medoids, spreads = {}, {}, {}
    single = torch.nonzero(size == 1).flatten()
    m = first[single]
    for cl, f, c, d in zip(single.tolist(), m.tolist(), category[m].tolist(), dist[m, m].tolist()):
        categories[cl], medoids[cl], spreads[cl] = c, f, d
    for cl in torch.nonzero(size > 1).flatten().tolist():
        idx = torch.nonzero(labels == cl).flatten()
        block = dist[idx][:, idx]
        m = int(idx[block.sum(1).argmin()])
        medoids[cl] = m
        spreads[cl] = float(dist[m, idx].mean())
        categories[cl] = int(torch.mode(category[idx]).values)
    order = sorted(medoids)
    return (
        {c: categories[c] for c in order},
        {c: medoids[c] for c in order},
        {c: spreads[c] for c in order},
    )


def _agglomerate(dist: Tensor, threshold: float | None, n_clusters: int | None, method: str) -> np.ndarray:
    """Flat agglomerative clusters ``(n,)`` numbered from 0 in order of first appearance, from a
    distance matrix ``(n, n)``: merged while the linkage distance stays at most ``threshold``, or
    cut into ``n_clusters`` (SciPy's hierarchy, the same partitions as scikit-learn's
    ``AgglomerativeClustering`` on a precomputed matrix, without its second of import time)."""
    if dist.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    tree = hierarchy.linkage(squareform(dist.double().numpy(), checks=False), method=method)
    if n_clusters is not None:
        flat = hierarchy.cut_tree(tree, n_clusters=n_clusters).ravel()  # exactly n_clusters
    else:
        flat = hierarchy.fcluster(tree, t=threshold, criterion="distance")
    return _first_appearance(flat)


def _first_appearance(flat: np.ndarray) -> np.ndarray:
    """Cluster ids ``(n,)`` renumbered from 0 in the order of their first member."""
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)
