"""Interpretability metrics (docs/method.md section 7): location instability and part interpretability."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress._progress import progress_bar
from icnn_compress.analysis._signatures import LayerSignature, layer_maps_point
from icnn_compress.errors import ConfigError

__all__ = ["location_instability", "location_instability_reference", "part_interpretability"]


def location_instability(
    sig: LayerSignature, *, top: int = 100, per: str = "best", min_images: int = 5
) -> dict:
    """Location instability (lower is better), as docs/method.md section 7 defines it.

    For filter f and landmark k, over the images that contain k (visible) take the top ``top``
    images by the filter's peak response; on each, ``d_I = ||p_k - p(mu_hat)|| / image diagonal``
    with ``p(mu_hat)`` the receptive-field centre of the peak unit; ``D_fk = std_I d_I``. A filter's
    score is the mean over landmarks; ``per="best"`` (multi-category, the spec's rule) restricts the
    images to one category at a time and keeps the best category's mean, ``per="category"`` uses
    the filter's own category, ``per="all"`` uses every image (single-category). Images where the
    filter does not fire (peak 0) are left out; a filter with fewer than ``min_images`` images for a
    landmark skips that landmark.

    Returns:
        ``{"score": mean over filters, "per_filter": (C,) tensor (NaN: filter never scored)}``.
    """
    if sig.landmarks is None:
        raise ConfigError(
            f"location_instability needs landmarks: the probe set of layer {sig.layer!r} had none "
            "(use a dataset with landmarks, e.g. SyntheticParts(annotations=True) or "
            "CUB200(annotations=True))."
        )
    if per not in ("best", "category", "all"):
        raise ConfigError(f"The 'per' parameter must be 'best', 'category' or 'all'. Got {per!r} instead.")
    h, w = sig.image_size
    diag = math.hypot(h, w)
    lm, labels = sig.landmarks, sig.labels
    num_classes = sig.class_mean.shape[1]
    scores = torch.full((sig.num_filters,), float("nan"))
    for f in range(sig.num_filters):
        fires = sig.peak_value[:, f] > 0
        if per == "all":
            groups = [torch.ones_like(fires)]
        elif per == "category":
            groups = [labels == sig.category[f]]
        else:
            groups = [labels == c for c in range(num_classes)]
        best = float("nan")
        for group in groups:
            ds = []
            for k in range(lm.shape[1]):
                sel = torch.nonzero(group & fires & (lm[:, k, 2] > 0)).flatten()
                if sel.numel() < min_images:
                    continue
                order = sig.peak_value[sel, f].argsort(descending=True)[:top]
                sel = sel[order]
                d = (lm[sel, k, :2] - sig.peak_xy[sel, f]).norm(dim=1) / diag
                ds.append(float(d.std()))
            if ds:
                mean = sum(ds) / len(ds)
                best = mean if math.isnan(best) else min(best, mean)
        scores[f] = best
    valid = scores[~scores.isnan()]
    return {"score": float(valid.mean()) if valid.numel() else float("nan"), "per_filter": scores}


def location_instability_reference(
    sig: LayerSignature, *, top: int = 100, per: str = "best", min_images: int = 5
) -> dict:
    """What ``location_instability`` gives filters whose behaviour is known, on the same probe set
    and layer: the scale against which a layer's score reads.

    * ``part_detectors``: ``(P,)`` the score of an ideal detector of each landmark: it fires exactly
      on the images where the landmark is visible, at the unit of the layer's map nearest to it
      (the best a filter of this layer can localise; NaN for a landmark seen on fewer than
      ``min_images`` images of every category);
    * ``floor``: the lowest of them, ``part_mean`` their mean; ``floor_exact``: the lowest with
      each detector's peak exactly on its landmark, not rounded to a unit (what a finer map could
      approach);
    * ``fixed``: a filter that fires on every image at the unit nearest the image centre, whatever
      the image shows (no localisation at all).

    A detector of one part still scores above 0, because the score averages over every landmark
    and the other parts move relative to it; and the map's stride rounds every position. A layer
    whose filters score near ``floor`` localises about as well as its resolution allows; one near
    ``fixed`` no better than a constant position. ``top``, ``per``, ``min_images``: as in
    ``location_instability`` (``per="category"`` is read as ``"best"``: the ideal detectors have no
    category).
    """
    if sig.landmarks is None:
        raise ConfigError(
            f"location_instability_reference needs landmarks: the probe set of layer {sig.layer!r} had "
            "none (use a dataset with landmarks, e.g. SyntheticParts(annotations=True))."
        )
    lm = sig.landmarks.float()
    n, parts = lm.shape[0], lm.shape[1]
    h, w = sig.mean_map.shape[-2:]
    rf = sig.rf

    def on_map(xy: Tensor) -> Tensor:  # the receptive-field centre of the unit nearest to xy
        col = ((xy[..., 0] - rf.offset) / rf.stride).round().clamp(0, w - 1)
        row = ((xy[..., 1] - rf.offset) / rf.stride).round().clamp(0, h - 1)
        return torch.stack([rf.offset + rf.stride * col, rf.offset + rf.stride * row], -1)

    height, width = sig.image_size
    centre = on_map(torch.tensor([(width - 1) / 2, (height - 1) / 2])).expand(n, 2)
    # filters: P detectors on the map, P exactly on the landmarks, one fixed at the centre
    peak_xy = torch.cat([on_map(lm[:, :, :2]), lm[:, :, :2], centre[:, None]], dim=1)  # (N, 2P + 1, 2)
    visible = (lm[:, :, 2] > 0).float()
    fires = torch.cat([visible, visible, torch.ones(n, 1)], dim=1)
    ideal = dataclasses.replace(
        sig,
        peak_xy=peak_xy,
        peak_value=fires,
        category=torch.zeros(2 * parts + 1, dtype=torch.long),
        class_mean=torch.zeros(2 * parts + 1, sig.class_mean.shape[1]),
    )
    scores = location_instability(
        ideal, top=top, per="all" if per == "all" else "best", min_images=min_images
    )["per_filter"]
    detectors, exact = scores[:parts], scores[parts : 2 * parts]
    seen, seen_exact = detectors[~detectors.isnan()], exact[~exact.isnan()]
    nan = float("nan")
    return {
        "part_detectors": detectors,
        "floor": float(seen.min()) if seen.numel() else nan,
        "part_mean": float(seen.mean()) if seen.numel() else nan,
        "floor_exact": float(seen_exact.min()) if seen_exact.numel() else nan,
        "fixed": float(scores[2 * parts]),
    }


@torch.no_grad()
def part_interpretability(
    model: nn.Module,
    loader: DataLoader,
    layer: str,
    *,
    quantile: float = 0.005,
    iou_threshold: float = 0.2,
    max_images: int | None = 2048,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Part interpretability (higher is better), after Bau et al.'s network dissection.

    Each filter's maps are thresholded at the value exceeded by the top ``quantile`` of all its
    positions over the probe set; the maps are upsampled (bilinear) to the image and the region
    above the threshold is compared with every ground-truth part mask; the filter detects part k on
    an image if IoU > ``iou_threshold``. ``P_fk`` = fraction of the images with part k where it
    detects it, ``P_f = max_k P_fk``; the score is the mean over filters.

    The loader must yield ``(images, labels, landmarks, masks)`` with masks ``(N, P, H, W)``
    (``SyntheticParts(annotations=True)``). Maps are kept in float16 for up to ``max_images``.

    Returns:
        ``{"score", "per_filter": (C,), "per_part": (C, P) P_fk, "best_part": (C,)}``.
    """
    if not 0 < quantile < 1:
        raise ConfigError(f"quantile must be in (0, 1). Got {quantile!r} instead.")
    device = torch.device(device) if device else next(model.parameters()).device
    point = layer_maps_point(model, layer)
    captured: list[Tensor] = []
    hook = model.get_submodule(point).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    maps_all, masks_all, seen = [], [], 0
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(loader, progress=progress, desc="part IoU", leave=False):
            if len(batch) < 4 or batch[3].dim() != 4:
                raise ConfigError(
                    "part_interpretability needs part masks: the loader must yield (images, labels, "
                    "landmarks, masks) with masks (N, P, H, W), e.g. SyntheticParts(annotations=True)."
                )
            x, masks = batch[0], batch[3]
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None and seen + len(x) > max_images:
                x, masks = x[: max_images - seen], masks[: max_images - seen]
            captured.clear()
            model(x.to(device))
            maps_all.append(captured[0].float().clamp_min(0).half().cpu())
            masks_all.append(masks.bool())
            seen += len(x)
    finally:
        hook.remove()
        model.train(was_training)
    maps, masks = torch.cat(maps_all), torch.cat(masks_all)
    n, c = maps.shape[:2]
    image_hw = masks.shape[-2:]
    per_filter_values = maps.float().permute(1, 0, 2, 3).reshape(c, -1)
    thresh = torch.quantile(per_filter_values, 1 - quantile, dim=1)  # (C,)
    present = masks.flatten(2).any(2)  # (N, P)
    detect = torch.zeros(c, masks.shape[1])
    part_area = masks.flatten(2).sum(2).float()  # (N, P)
    for i in range(n):
        up = F.interpolate(maps[i : i + 1].float(), size=image_hw, mode="bilinear", align_corners=False)[0]
        # ">=" so that ties at the threshold count; "> 0" so that a threshold of 0 selects nothing
        region = ((up >= thresh[:, None, None]) & (up > 0)).flatten(1).float()  # (C, HW)
        m = masks[i].flatten(1).float()  # (P, HW)
        inter = region @ m.t()  # (C, P)
        union = region.sum(1, keepdim=True) + part_area[i][None, :] - inter
        iou = inter / union.clamp_min(1)
        detect += ((iou > iou_threshold) & present[i][None, :]).float()
    counts = present.sum(0).float()
    p_fk = detect / counts.clamp_min(1)[None, :]
    p_fk[:, counts == 0] = 0.0
    best, best_part = p_fk.max(1)
    return {"score": float(best.mean()), "per_filter": best, "per_part": p_fk, "best_part": best_part}
