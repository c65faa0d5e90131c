"""Pictures of filters (matplotlib, PNG): top images with heat maps by cluster, histograms, overview."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from icnn_compress.analysis._clusters import FilterClusters
from icnn_compress.analysis._signatures import LayerSignature

__all__ = ["plot_cluster_overview", "plot_filter_gallery", "plot_instability_histogram"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    _plt().close(fig)
    return out


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    img = img.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0).numpy()


@torch.no_grad()
def plot_filter_gallery(
    model: nn.Module,
    dataset: Dataset,
    sig: LayerSignature,
    clusters: FilterClusters | None,
    path: str | os.PathLike,
    *,
    images_per_filter: int = 4,
    max_clusters: int = 8,
    filters_per_cluster: int = 3,
) -> Path:
    """Each filter's top images with its map upsampled over them (the paper's figure style),
    one row per filter, rows grouped by cluster (medoid first).

    ``dataset`` must be the probe set in the order it was probed (``sig.topk_index`` indexes it).
    """
    plt = _plt()
    device = next(model.parameters()).device
    if clusters is not None:
        groups = sorted(clusters.medoids, key=lambda c: -len(clusters.members(c)))[:max_clusters]
        rows = []
        for c in groups:
            members = [clusters.medoids[c]] + [m for m in clusters.members(c) if m != clusters.medoids[c]]
            rows += [(c, f) for f in members[:filters_per_cluster]]
    else:
        rows = [(None, f) for f in range(min(sig.num_filters, max_clusters * filters_per_cluster))]
    maps: dict = {}
    hook = model.get_submodule(sig.point).register_forward_hook(lambda m, i, o: maps.__setitem__("x", o))
    was_training = model.training
    model.eval()
    fig, axes = plt.subplots(
        len(rows), images_per_filter, figsize=(1.6 * images_per_filter, 1.6 * len(rows)), squeeze=False
    )
    try:
        for r, (c, f) in enumerate(rows):
            for k in range(images_per_filter):
                ax = axes[r][k]
                ax.axis("off")
                if k >= sig.topk_index.shape[1]:
                    continue
                idx = int(sig.topk_index[f, k])
                img = dataset[idx][0]
                model(img[None].to(device))
                heat = (
                    F.interpolate(
                        maps["x"][:, f : f + 1].float().clamp_min(0),
                        size=img.shape[-2:],
                        mode="bilinear",
                        align_corners=False,
                    )[0, 0]
                    .cpu()
                    .numpy()
                )
                ax.imshow(_to_rgb(img.cpu()))
                ax.imshow(heat, cmap="jet", alpha=0.45)
                if k == 0:
                    label = f"f{f}" + (f" c{c}" if c is not None else "") + f" cat{int(sig.category[f])}"
                    ax.set_title(label, fontsize=7, loc="left")
    finally:
        hook.remove()
        model.train(was_training)
    fig.suptitle(f"{sig.layer}: top images per filter, grouped by cluster", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_instability_histogram(
    per_filter: dict[str, torch.Tensor],
    path: str | os.PathLike,
    title: str = "location instability per filter",
) -> Path:
    """Overlaid histograms of per-filter location instability, one series per name (e.g. with /
    without the loss)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in per_filter.items():
        v = values[~values.isnan()].numpy()
        ax.hist(v, bins=20, alpha=0.55, label=f"{name} (mean {v.mean():.3f})" if v.size else name)
    ax.set_xlabel("instability (std of peak-landmark distance / diagonal)")
    ax.set_ylabel("filters")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_cluster_overview(sig: LayerSignature, clusters: FilterClusters, path: str | os.PathLike) -> Path:
    """Left: the distance matrix ordered by cluster; right: each filter's mean peak location on its
    category's images, coloured by cluster."""
    plt = _plt()
    order = torch.argsort(clusters.labels * 10000 + torch.arange(sig.num_filters))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    im = a.imshow(clusters.distances[order][:, order].numpy(), cmap="viridis")
    a.set_title(f"{sig.layer}: distances ({clusters.num_clusters} clusters)", fontsize=9)
    fig.colorbar(im, ax=a, fraction=0.046)
    h, w = sig.image_size
    pts = []
    for f in range(sig.num_filters):
        own = (sig.labels == sig.category[f]) & (sig.peak_value[:, f] > 0)
        pts.append(sig.peak_xy[own, f].mean(0) if own.any() else torch.tensor([float("nan")] * 2))
    pts = torch.stack(pts).numpy()
    b.scatter(pts[:, 0], pts[:, 1], c=clusters.labels.numpy(), cmap="tab20", s=18)
    b.set_xlim(0, w)
    b.set_ylim(h, 0)
    b.set_aspect("equal")
    b.set_title("mean peak location per filter (colour = cluster)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
