"""Filter analysis: receptive fields, signatures, interpretability metrics, clusters, pictures.

Example:
    >>> sig = filter_signatures(model, probe_loader, ["features.20"])
    >>> clusters = cluster_filters(sig["features.20"])
    >>> location_instability(sig["features.20"])["score"]
"""

from icnn_compress.analysis._clusters import (
    FilterClusters,
    cluster_filters,
    filter_distances,
    ground_truth_parts,
)
from icnn_compress.analysis._metrics import (
    location_instability,
    location_instability_reference,
    part_interpretability,
)
from icnn_compress.analysis._pictures import (
    plot_cluster_overview,
    plot_filter_gallery,
    plot_instability_histogram,
)
from icnn_compress.analysis._receptive_field import RF, receptive_field, receptive_fields
from icnn_compress.analysis._signatures import (
    LayerSignature,
    filter_parts,
    filter_signatures,
    layer_maps_point,
    layer_maps_points,
)

__all__ = [
    "RF",
    "FilterClusters",
    "LayerSignature",
    "cluster_filters",
    "filter_distances",
    "filter_parts",
    "filter_signatures",
    "ground_truth_parts",
    "layer_maps_point",
    "layer_maps_points",
    "location_instability",
    "location_instability_reference",
    "part_interpretability",
    "plot_cluster_overview",
    "plot_filter_gallery",
    "plot_instability_histogram",
    "receptive_field",
    "receptive_fields",
]
