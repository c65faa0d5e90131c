"""Per-filter signatures from a probe set: category, class responses, peaks, spatial means."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress._progress import progress_bar
from icnn_compress.analysis._receptive_field import RF, receptive_fields
from icnn_compress.errors import ConfigError, ICNNError
from icnn_compress.icnn import ICNNHandle, find_activation
from icnn_compress.icnn._attach import trace_graph

__all__ = ["LayerSignature", "filter_parts", "filter_signatures", "layer_maps_point", "layer_maps_points"]


@dataclass
class LayerSignature:
    """What one layer's filters do on the probe set (N images, C filters, K classes, h x w maps).

    Attributes:
        layer: the layer name given; ``point``: the module whose output was read (post-ReLU).
        category: ``(C,)`` filter -> class (the ICNN handle's where attached, else the paper's rule:
            argmax over classes of the mean ``sum_ij x``).
        class_mean: ``(C, K)`` mean of ``sum_ij x`` per class.
        peak_value: ``(N, C)`` ``max_ij x`` per image; ``peak_rc``: ``(N, C, 2)`` its (row, col) in
            the map; ``peak_xy``: ``(N, C, 2)`` the centre of that unit's receptive field, (x, y)
            in input pixels.
        mean_map: ``(C, h, w)`` mean map. ``alive``: ``(C,)`` fraction of images with ``max x > 0``.
        topk_index, topk_value: ``(C, k)`` probe indices and peak values of each filter's top images.
        labels: ``(N,)``; ``landmarks``: ``(N, P, 3)`` (x, y, visible) when the probe set has them.
        rf: the layer's receptive field; ``image_size``: ``(H, W)`` of the inputs.
    """

    layer: str
    point: str
    category: Tensor
    class_mean: Tensor
    peak_value: Tensor
    peak_rc: Tensor
    peak_xy: Tensor
    mean_map: Tensor
    alive: Tensor
    topk_index: Tensor
    topk_value: Tensor
    labels: Tensor
    rf: RF
    image_size: tuple[int, int]
    landmarks: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_filters(self) -> int:
        return self.category.numel()


def layer_maps_point(model: nn.Module, layer: str) -> str:
    """The module whose output holds ``layer``'s post-ReLU maps (the ReLU after a conv)."""
    return layer_maps_points(model, [layer])[layer]


def layer_maps_points(model: nn.Module, layers: list[str]) -> dict[str, str]:
    """``layer_maps_point`` of several layers, with at most one trace of the model."""
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    graph = trace_graph(model) if convs else None
    out = {name: name for name in layers}  # not a conv, or no ReLU: maps clamped at 0 later
    for name in convs:
        with contextlib.suppress(ICNNError):
            out[name] = find_activation(model, name, graph=graph)
    return out


@torch.no_grad()
def filter_signatures(
    model: nn.Module,
    loader: DataLoader,
    layers: list[str] | str,
    *,
    num_classes: int | None = None,
    handle: ICNNHandle | None = None,
    top_k: int = 16,
    max_images: int | None = 4096,
    device: str | torch.device | None = None,
    progress: bool = True,
    fields: dict[str, RF] | None = None,
) -> dict[str, LayerSignature]:
    """Stream a probe set through ``model`` and summarise each filter of ``layers``.

    Memory is bounded by ``max_images``: per image only one peak (value and location) per filter
    is kept, plus running class sums, a running mean map and each filter's top-``k`` images.

    Args:
        model: the network (eval mode is used and restored).
        loader: batches of ``(images, labels[, landmarks[, masks]])``.
        layers: module names (a conv's ReLU is found, as in ``attach_icnn``).
        num_classes: K (default: max label + 1).
        handle: an ICNN handle whose ``filter_categories`` override the paper's rule.
        top_k: images kept per filter for pictures.
        max_images: stop after this many probe images (``None``: the whole loader).
        fields: the receptive fields of the layers' map points for the probe's image size, when the
            caller has them (``receptive_fields``); default: found here, with one trace.

    Returns:
        layer name -> ``LayerSignature``.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ConfigError("filter_signatures needs at least one layer name.")
    device = torch.device(device) if device else next(model.parameters()).device
    points = layer_maps_points(model, names)
    captured: dict[str, Tensor] = {}
    hooks = [
        model.get_submodule(point).register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o.detach())
        )
        for name, point in points.items()
    ]
    was_training = model.training
    model.eval()
    state: dict[str, dict] = {name: {} for name in names}
    labels_all, landmarks_all, image_size, seen = [], [], None, 0
    try:
        bar = progress_bar(loader, progress=progress, desc="signatures", leave=False)
        for batch in bar:
            x, y = batch[0].to(device), batch[1]
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None and seen + len(y) > max_images:
                keep = max_images - seen
                x, y = x[:keep], y[:keep]
                batch = [b[:keep] if torch.is_tensor(b) else b for b in batch]
            image_size = tuple(x.shape[-2:])
            model(x)
            labels_all.append(y.cpu())
            if len(batch) > 2 and torch.is_tensor(batch[2]) and batch[2].dim() == 3:
                landmarks_all.append(batch[2].cpu().float())
            for name in names:
                maps = captured[name].float().clamp_min(0)
                _accumulate(state[name], maps, y.cpu(), seen, top_k)
            seen += len(y)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ConfigError("filter_signatures got an empty probe set.")
    labels = torch.cat(labels_all)
    k = num_classes or int(labels.max()) + 1
    landmarks = torch.cat(landmarks_all) if landmarks_all and len(landmarks_all) == len(labels_all) else None
    cats = handle.filter_categories if handle is not None else {}
    out = {}
    wanted = sorted(set(points.values()))
    if fields is not None and set(wanted) <= set(fields):
        rfs = fields
    else:
        rfs = receptive_fields(model, wanted, (x.shape[1], *image_size))  # one trace
    for name in names:
        st = state[name]
        rf = rfs[points[name]]
        class_sum = torch.zeros(st["sum"].shape[1], k)
        class_sum.index_add_(1, labels, torch.cat(st["sum_rows"], 0).t())
        counts = torch.bincount(labels, minlength=k).clamp_min(1).float()
        class_mean = class_sum / counts
        category = class_mean.argmax(1)
        if name in cats and cats[name].numel() == category.numel() and bool((cats[name] >= 0).all()):
            category = cats[name].cpu().clone()
        peak_rc = torch.cat(st["peak_rc"], 0)
        px, py = rf.centre(peak_rc[..., 0].float(), peak_rc[..., 1].float())
        out[name] = LayerSignature(
            layer=name,
            point=points[name],
            category=category,
            class_mean=class_mean,
            peak_value=torch.cat(st["peak_value"], 0),
            peak_rc=peak_rc,
            peak_xy=torch.stack([px, py], -1),
            mean_map=st["map_sum"] / seen,
            alive=st["alive"] / seen,
            topk_index=st["topk_index"],
            topk_value=st["topk_value"],
            labels=labels,
            rf=rf,
            image_size=image_size,
            landmarks=landmarks,
        )
    return out


def _accumulate(st: dict, maps: Tensor, labels: Tensor, offset: int, top_k: int) -> None:
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w)
    value, idx = flat.max(dim=2)
    value, idx = value.cpu(), idx.cpu()
    rc = torch.stack([idx // w, idx % w], -1)
    if not st:
        st.update(
            sum=torch.zeros(1, c),
            sum_rows=[],
            peak_value=[],
            peak_rc=[],
            alive=torch.zeros(c),
            map_sum=torch.zeros(c, h, w),
            topk_value=torch.full((c, 0), -1.0),
            topk_index=torch.zeros((c, 0), dtype=torch.long),
        )
    st["sum_rows"].append(flat.sum(2).cpu())
    st["peak_value"].append(value)
    st["peak_rc"].append(rc)
    st["alive"] += (value > 0).float().sum(0)
    st["map_sum"] += maps.sum(0).cpu()
    vals = torch.cat([st["topk_value"], value.t()], 1)
    inds = torch.cat([st["topk_index"], (torch.arange(n) + offset).expand(c, n)], 1)
    keep = vals.topk(min(top_k, vals.shape[1]), dim=1)
    st["topk_value"], st["topk_index"] = keep.values, inds.gather(1, keep.indices)


def filter_parts(sig: LayerSignature, top: int | None = None) -> Tensor | None:
    """``(C,)`` the part each filter's peaks fall nearest to, on average over its top images where
    the part is visible (landmark index; -1 for a filter that never fires), or ``None`` when the
    probe set has no landmarks. ``top``: how many of each filter's top images (default: all kept)."""
    if sig.landmarks is None:
        return None
    idx = sig.topk_index if top is None else sig.topk_index[:, :top]
    out = torch.full((sig.num_filters,), -1, dtype=torch.long)
    for f in range(sig.num_filters):
        images = idx[f]
        fired = sig.peak_value[images, f] > 0
        if not bool(fired.any()):
            continue
        images = images[fired]
        peaks = sig.peak_xy[images, f]  # (n, 2) x, y
        marks = sig.landmarks[images]  # (n, P, 3) x, y, visible
        dist = (marks[..., :2] - peaks[:, None, :]).norm(dim=-1)  # (n, P)
        visible = marks[..., 2] > 0
        mean = (dist * visible).sum(0) / visible.sum(0).clamp_min(1)
        mean[visible.sum(0) == 0] = float("inf")
        if bool(torch.isfinite(mean).any()):
            out[f] = int(mean.argmin())
    return out
