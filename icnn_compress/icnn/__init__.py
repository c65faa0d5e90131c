"""The interpretable filter loss of Zhang, Wu and Zhu, "Interpretable CNNs" (CVPR 2018).

Public API:
    make_templates, mutual_information: the paper's templates and exact MI(X; T).
    ICNNMask: the mask layer.
    attach_icnn, ICNNHandle, ICNNOptions: masks + loss on named layers of any model, through hooks,
        and the loss's options as one typed object.
    approximate_gradient, assign_categories, FilterLossState: the pieces of the loss.
    use_fused: whether the loss statistics run compiled (``ICNNOptions.fuse``) on a device.
"""

from icnn_compress.icnn._attach import ICNNHandle, attach_icnn, find_activation, last_conv_name, top_layers
from icnn_compress.icnn._loss import FilterLossState, approximate_gradient, assign_categories, use_fused
from icnn_compress.icnn._mask import ICNNMask
from icnn_compress.icnn._options import ICNNOptions
from icnn_compress.icnn._templates import (
    default_tau,
    log_template_prior,
    make_templates,
    mask_shape,
    mutual_information,
    template_scores,
)

__all__ = [
    "FilterLossState",
    "ICNNHandle",
    "ICNNMask",
    "ICNNOptions",
    "approximate_gradient",
    "assign_categories",
    "attach_icnn",
    "default_tau",
    "find_activation",
    "last_conv_name",
    "log_template_prior",
    "make_templates",
    "mask_shape",
    "mutual_information",
    "template_scores",
    "top_layers",
    "use_fused",
]
