"""icnn-compress: interpretable filters, filter clustering, real pruning, ONNX export.

Example:
    >>> import icnn_compress as ic
    >>> model = ic.models.create("vgg_small", num_classes=10, in_channels=1)
    >>> train_dl, val_dl = ic.data.loaders("fashion-mnist", batch_size=128)
    >>> icnn = ic.attach_icnn(model, layers="auto", num_classes=10)
    >>> ic.Trainer(model, train_dl, val_dl, extra_loss=icnn.loss, epochs=3).fit()

The subpackages and the names below are imported on first use, so ``import icnn_compress`` (and
``prune-recipe --help``) does not load torch until something needs it.
"""

from __future__ import annotations

import importlib

from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError, DataError, IcnnCompressError, ICNNError, TrainingError

# name -> module that defines it (a subpackage is its own module)
_LAZY = {
    "data": "icnn_compress.data",
    "icnn": "icnn_compress.icnn",
    "models": "icnn_compress.models",
    "ICNNHandle": "icnn_compress.icnn",
    "attach_icnn": "icnn_compress.icnn",
    "Callback": "icnn_compress.train",
    "Distillation": "icnn_compress.train",
    "Trainer": "icnn_compress.train",
    "frozen_copy": "icnn_compress.train",
}

__all__ = [
    "Callback",
    "ConfigError",
    "DataError",
    "Distillation",
    "ICNNError",
    "ICNNHandle",
    "IcnnCompressError",
    "Trainer",
    "TrainingError",
    "__version__",
    "attach_icnn",
    "data",
    "frozen_copy",
    "icnn",
    "models",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'icnn_compress' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
