"""Model registry: torchvision classifiers and small CPU-sized models.

Example:
    >>> from icnn_compress import models
    >>> net = models.create("resnet18", num_classes=10, in_channels=1, small_input=True)
"""

from icnn_compress.models import _small, _torchvision  # noqa: F401  (registers the models)
from icnn_compress.models._registry import create, list_models, register_model
from icnn_compress.models._small import CifarResNet, VGGSmall
from icnn_compress.models._weights import load_weights, torchvision_weights_state_dict

__all__ = [
    "CifarResNet",
    "VGGSmall",
    "create",
    "list_models",
    "load_weights",
    "register_model",
    "torchvision_weights_state_dict",
]
