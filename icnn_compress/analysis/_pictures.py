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


def _rf_window(sig: LayerSignature, image: int, f: int, hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns ``((y0, y1), (x0, x1))`` of filter ``f``'s receptive field around its peak
    on probe image ``image``, clipped to the image (at least 4 px wide)."""
    h, w = int(hw[0]), int(hw[1])
    x, y = (float(v) for v in sig.peak_xy[image, f])
    half = max(2.0, min(sig.rf.size, max(h, w)) / 2)
    y0, y1 = int(max(0, round(y - half))), int(min(h, round(y + half)))
    x0, x1 = int(max(0, round(x - half))), int(min(w, round(x + half)))
    return (y0, max(y1, min(h, y0 + 4))), (x0, max(x1, min(w, x0 + 4)))


def _blend(picture: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``picture`` (H, W, 3) in [0, 1] with ``heat`` (H, W) drawn over it in the jet colour map,
    scaled to the heat's own range (as ``imshow`` would)."""
    from matplotlib import colormaps

    lo, hi = float(heat.min()), float(heat.max())
    colour = colormaps["jet"]((heat - lo) / max(hi - lo, 1e-8))[..., :3]
    return (1 - alpha) * picture + alpha * colour


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
    crop: bool = True,
    class_names: list[str] | None = None,
    part_names: list[str] | None = None,
) -> Path:
    """Each filter's top images with its map upsampled over them (the paper's figure style),
    one row per filter, rows grouped by cluster (medoid first). Each row is titled with the
    filter, its cluster, its category and, when the probe set has landmarks, the part its peaks
    fall nearest to (``filter_parts``).

    ``dataset`` must be the probe set in the order it was probed (``sig.topk_index`` indexes it).
    ``crop``: show the patch the filter sees, the receptive field around the peak of its map
    (clipped at the image border, so a patch at the border is smaller), instead of the whole image.
    All patches share one scale; the picture is one mosaic drawn in a single pass.
    """
    from icnn_compress.analysis._signatures import filter_parts

    parts = filter_parts(sig)
    if clusters is not None:
        groups = sorted(clusters.medoids, key=lambda c: -len(clusters.members(c)))[:max_clusters]
        rows = []
        for c in groups:
            members = [clusters.medoids[c]] + [m for m in clusters.members(c) if m != clusters.medoids[c]]
            rows += [(c, f) for f in members[:filters_per_cluster]]
    else:
        rows = [(None, f) for f in range(min(sig.num_filters, max_clusters * filters_per_cluster))]
    shown = min(images_per_filter, int(sig.topk_index.shape[1]))
    wanted = sorted({int(sig.topk_index[f, k]) for _, f in rows for k in range(shown)})
    images = {i: dataset[i][0] for i in wanted}
    maps: dict = {}
    hook = model.get_submodule(sig.point).register_forward_hook(lambda m, i, o: maps.__setitem__("x", o))
    was_training = model.training
    model.eval()
    try:  # one batched pass over every image the gallery shows
        device = next(model.parameters()).device
        batch = torch.stack([images[i] for i in wanted]) if wanted else None
        if batch is not None:
            model(batch.to(device))
    finally:
        hook.remove()
        model.train(was_training)
    position = {i: n for n, i in enumerate(wanted)}
    cells: list[list[np.ndarray | None]] = []
    for _, f in rows:
        line: list[np.ndarray | None] = []
        for k in range(images_per_filter):
            if k >= shown:
                line.append(None)
                continue
            idx = int(sig.topk_index[f, k])
            img = images[idx]
            heat = F.interpolate(
                maps["x"][position[idx] : position[idx] + 1, f : f + 1].float().clamp_min(0).cpu(),
                size=img.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )[0, 0].numpy()
            picture = _to_rgb(img.cpu())
            if crop:
                (y0, y1), (x0, x1) = _rf_window(sig, idx, f, img.shape[-2:])
                picture, heat = picture[y0:y1, x0:x1], heat[y0:y1, x0:x1]
            line.append(_blend(picture, heat))
        cells.append(line)
    drawn = [c for line in cells for c in line if c is not None]
    side = max((max(c.shape[:2]) for c in drawn), default=8)
    gap, band = max(1, side // 12), max(6, int(round(side * 0.28)))  # pixels: between cells, for a title
    width = images_per_filter * (side + gap) + gap
    height = len(rows) * (band + side) + gap
    mosaic = np.ones((height, width, 3))
    for r, line in enumerate(cells):
        top = r * (band + side) + band
        for k, cell in enumerate(line):
            if cell is None:
                continue
            h, w = cell.shape[:2]  # a patch clipped at the border sits centred in its cell
            y, x = top + (side - h) // 2, gap + k * (side + gap) + (side - w) // 2
            mosaic[y : y + h, x : x + w] = cell
    plt = _plt()
    inch = 1.6 * images_per_filter / width  # inches per mosaic pixel
    title = 0.35
    total = height * inch + title
    fig = plt.figure(figsize=(width * inch, total))
    ax = fig.add_axes((0, 0, 1, height * inch / total))
    ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")
    ax.set_axis_off()
    for r, (c, f) in enumerate(rows):
        cat = int(sig.category[f])
        label = f"f{f}" + (f" c{c}" if c is not None else "")
        label += f" {class_names[cat] if class_names and cat < len(class_names) else f'cat{cat}'}"
        if parts is not None and int(parts[f]) >= 0:
            p = int(parts[f])
            label += f" / {part_names[p] if part_names and p < len(part_names) else f'part{p}'}"
        ax.text(gap, r * (band + side) + band - 1, label, fontsize=7, va="bottom", ha="left")
    heading = f"{sig.layer}: top images per filter, grouped by cluster"
    fig.suptitle(heading, fontsize=9, y=1 - title / 2 / total, va="center")
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
