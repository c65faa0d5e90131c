"""Structural pruning: criteria (torch-pruning Importance classes), targets, compensation, save/load.

Example:
    >>> from icnn_compress.prune import prune_model, Target
    >>> res = prune_model(model, torch.rand(1, 1, 28, 28), criterion="icnn-cluster",
    ...                   target=Target(macs_reduction=2.0), data=probe_loader, compensate=True)
"""

from icnn_compress.prune._classes import kept_class_batches, restrict_classifier
from icnn_compress.prune._compensation import compensate_group, fit_reconstruction
from icnn_compress.prune._criteria import (
    ClusterRedundancyImportance,
    CriterionSpec,
    criterion_spec,
    list_criteria,
    make_importance,
    register_criterion,
)
from icnn_compress.prune._engine import (
    PruneResult,
    Target,
    TargetError,
    UnsupportedModelError,
    prune_filters,
    prune_model,
)
from icnn_compress.prune._gradual import GradualPruning, gradual_schedule
from icnn_compress.prune._io import load_pruned, read_pruned_record, rebuild_pruned, save_pruned
from icnn_compress.prune._probe import collect_layer_inputs, reestimate_batchnorm
from icnn_compress.prune._refit import refit_classifier

__all__ = [
    "ClusterRedundancyImportance",
    "CriterionSpec",
    "GradualPruning",
    "PruneResult",
    "Target",
    "TargetError",
    "UnsupportedModelError",
    "collect_layer_inputs",
    "compensate_group",
    "criterion_spec",
    "fit_reconstruction",
    "gradual_schedule",
    "kept_class_batches",
    "list_criteria",
    "load_pruned",
    "make_importance",
    "prune_filters",
    "prune_model",
    "read_pruned_record",
    "rebuild_pruned",
    "reestimate_batchnorm",
    "refit_classifier",
    "register_criterion",
    "restrict_classifier",
    "save_pruned",
]
