"""icnn-compress: interpretable filters, filter clustering, real pruning, ONNX export.

Example:
    >>> import icnn_compress as ic
    >>> model = ic.models.create("vgg_small", num_classes=10, in_channels=1)
    >>> train_dl, val_dl = ic.data.loaders("fashion-mnist", batch_size=128)
    >>> icnn = ic.attach_icnn(model, layers="auto", num_classes=10)
    >>> ic.Trainer(model, train_dl, val_dl, extra_loss=icnn.loss, epochs=3).fit()
"""

from icnn_compress import data, icnn, models
from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError, DataError, IcnnCompressError, ICNNError, TrainingError
from icnn_compress.icnn import ICNNHandle, attach_icnn
from icnn_compress.train import Callback, Distillation, Trainer, frozen_copy

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
